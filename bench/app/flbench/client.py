"""Benchmark ClientApp: builds fedct's default model (imports torch + MONAI like the real one), loads the received
weights into it, "trains" by sleeping a fixed time, and sends the weights back."""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flbench.layout import from_content, to_content
from models.factory import ModelConfig, build_model

app = ClientApp()


def _load(msg: Message) -> torch.nn.Module:
    model = build_model(ModelConfig())
    shapes = {k: v.shape for k, v in model.state_dict().items()}  # Flower sends 0-d arrays as shape (1,)
    state = {k: torch.from_numpy(v.copy()).reshape(shapes[k]) for k, v in from_content(msg.content).items()}
    model.load_state_dict(state)
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()  # wall clock (same host): where the round's time goes, with the server's timestamps
    model = _load(msg)
    loaded = time.time()
    seconds = float(context.run_config["train-seconds"])
    time.sleep(seconds)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    content = to_content(state, str(context.run_config["layout"]))
    content["metrics"] = MetricRecord(
        {
            "compute-seconds": seconds,
            "num-examples": 1,
            "t-handler-start": started,
            "t-model-loaded": loaded,
            "t-handler-end": time.time(),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _load(msg)  # evaluation itself is left out: its reply carries metrics only
    content = RecordDict({"metrics": MetricRecord({"compute-seconds": 0.0, "num-examples": 1})})
    return Message(content=content, reply_to=msg)
