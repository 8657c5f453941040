"""Benchmark ServerApp: FedAvg rounds (train + optional evaluate exchange) timed per round, written as JSON.

``reply-poll-s = 3.0`` uses Flower's ``Grid.send_and_receive`` (it sleeps a hard-coded 3 s between reply
polls); any other value uses ``grid.push_messages`` + ``grid.pull_messages`` polled every ``reply-poll-s``.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from bench.deployment import tree_cpu_seconds
from flbench.layout import from_content, nbytes, to_content
from models.factory import ModelConfig, build_model

app = ServerApp()


def exchange(grid: Grid, messages: list[Message], poll_s: float, timeout_s: float = 3600.0) -> list[Message]:
    """Send and wait for every reply."""
    if poll_s == 3.0:
        return list(grid.send_and_receive(messages, timeout=timeout_s))
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(poll_s)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, layout, poll_s = int(cfg["num-server-rounds"]), str(cfg["layout"]), float(cfg["reply-poll-s"])
    torch.manual_seed(0)
    state = OrderedDict((k, v.detach().numpy().copy()) for k, v in build_model(ModelConfig()).state_dict().items())
    while len(nodes := list(grid.get_node_ids())) < int(cfg["min-nodes"]):
        time.sleep(0.2)
    roots = {int(p) for p in str(cfg.get("watch-pids", "")).split(",") if p.strip()}
    results = []
    for server_round in range(1, rounds + 1):
        t0 = time.perf_counter()
        cpu0 = tree_cpu_seconds(roots) if roots else 0.0
        compute = 0.0
        sent = received = 0
        timeline: dict[str, float] = {}
        kinds = ["train", "evaluate"] if bool(cfg["evaluate"]) else ["train"]
        for kind in kinds:
            messages = []
            for node in nodes:
                content = to_content(state, layout)
                content["config"] = ConfigRecord({"server-round": server_round})
                sent += nbytes(content)
                messages.append(Message(content=content, dst_node_id=node, message_type=kind))
            t_send = time.time()
            replies = exchange(grid, messages, poll_s)
            t_replies = time.time()
            if len(replies) != len(nodes) or any(r.has_error() for r in replies):
                raise RuntimeError(f"round {server_round} {kind}: {len(replies)} replies of {len(nodes)}")
            compute += max(float(r.content["metrics"]["compute-seconds"]) for r in replies)
            if kind == "train":
                states = [from_content(r.content) for r in replies]
                received += sum(nbytes(r.content) for r in replies)
                state = OrderedDict(
                    (k, np.mean([s[k] for s in states], axis=0).astype(v.dtype).reshape(v.shape))
                    for k, v in state.items()
                )
                # timeline of the train exchange (wall clock, one host): send -> each site's handler -> all replies in
                m = [r.content["metrics"] for r in replies]
                timeline = {
                    "to_first_handler_start_s": min(float(x["t-handler-start"]) for x in m) - t_send,
                    "to_last_handler_start_s": max(float(x["t-handler-start"]) for x in m) - t_send,
                    "model_load_s_max": max(float(x["t-model-loaded"]) - float(x["t-handler-start"]) for x in m),
                    "last_handler_end_to_all_replies_s": t_replies - max(float(x["t-handler-end"]) for x in m),
                    "aggregate_s": time.time() - t_replies,
                }
        wall = time.perf_counter() - t0
        cpu = tree_cpu_seconds(roots) - cpu0 if roots else None
        results.append(
            {
                "round": server_round,
                "wall_s": round(wall, 3),
                "compute_s": compute,
                "deployment_cpu_s": None if cpu is None else round(cpu, 2),
                "overhead_s": round(wall - compute, 3),
                "bytes_sent": sent,
                "bytes_received": received,
                "train_timeline": {k: round(v, 3) for k, v in timeline.items()},
            }
        )
        print(f"flbench round {server_round}: wall {wall:.2f}s overhead {wall - compute:.2f}s", flush=True)
    model_bytes = sum(v.nbytes for v in state.values())
    Path(str(cfg["out"])).write_text(
        json.dumps(
            {"nodes": len(nodes), "model_bytes": model_bytes, "model_tensors": len(state), "rounds": results}, indent=1
        )
    )
