"""Sending the registry's champion to the sites through the federation (a Flower ``query.champion`` message).

At the start of a run with a model registry that has a champion, the ServerApp sends the champion's ``model.pt``,
``model.json`` and ``registry.json`` with its version and content SHA-256 to every connected site; each site verifies
the hash and stores the bundle (``fl_client.champion``), and ``fedct predict`` uses it by default. So a promotion (or
a rollback) reaches the sites with the next run, over the same authenticated channel as training, not a side
channel. This module only converts: the registry gives the files (``models.registry.ModelRegistry.package``).
"""

from __future__ import annotations

import json
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedct.protocol import CHAMPION_FILE_RECORD, CHAMPION_MESSAGE, CHAMPION_RECORD
from fl_server.config import ServerConfig, SiteRegistry
from fl_server.rounds import exchange
from fl_server.validation import ReplyRejected, site_identity
from models.registry import ModelRegistry

__all__ = ["DELIVERY_NAME", "champion_message_content", "send_champion"]

#: What the run folder records about the delivery: version, hash, the sites that stored it, the ones that did not.
DELIVERY_NAME = "champion-delivery.json"


def champion_message_content(version: str, content_sha256: str, files: dict[str, bytes]) -> RecordDict:
    """The message: ``model.pt`` as a uint8 array (chunked like weights), the rest as text in a ConfigRecord."""
    weights = np.frombuffer(files["model.pt"], dtype=np.uint8).copy()
    return RecordDict(
        {
            CHAMPION_FILE_RECORD: ArrayRecord({"model.pt": Array(weights)}),
            CHAMPION_RECORD: ConfigRecord(
                {
                    "version": version,
                    "content-sha256": content_sha256,
                    "model.json": files["model.json"].decode(),
                    "registry.json": files["registry.json"].decode(),
                }
            ),
        }
    )


def send_champion(
    grid: Grid, config: ServerConfig, *, registry: SiteRegistry | None = None, poll_s: float = 0.5
) -> dict[str, Any] | None:
    """Send the champion to every connected site (waiting for ``min-sites``, up to ``round-timeout-s``) and write
    ``<run-dir>/champion-delivery.json``; return it (None without a registry or a champion)."""
    if not config.model_registry:
        return None
    models = ModelRegistry(Path(config.model_registry))
    if models.champion() is None:
        return None
    version, digest, files = models.package("champion")
    nodes = _wait_for_nodes(grid, config.min_sites, timeout_s=config.round_timeout_s, poll_s=poll_s)
    content = champion_message_content(version, digest, files)
    messages = [
        Message(content, dst_node_id=node, message_type=CHAMPION_MESSAGE, group_id=f"champion-{version}")
        for node in nodes
    ]
    log(INFO, "fedct: sending the champion %s (SHA-256 %s) to %d site(s)", version, digest[:12], len(nodes))
    replies = exchange(grid, messages, timeout_s=config.round_timeout_s)
    stored: dict[str, str] = {}
    failed: list[dict[str, Any]] = []
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            failed.append({"node_id": node, "reason": reply.error.reason})
            continue
        try:
            site = site_identity(reply.content, node, registry)
        except ReplyRejected as exc:
            failed.append({"node_id": node, "reason": exc.code})
            continue
        record = reply.content.get(CHAMPION_RECORD) if CHAMPION_RECORD in reply.content else None
        if not isinstance(record, ConfigRecord) or record.get("content-sha256") != digest:
            failed.append({"node_id": node, "site": site, "reason": "the site stored another hash"})
            continue
        stored[site] = str(record.get("version"))
    failed += [{"node_id": n, "reason": "no reply"} for n in nodes if n not in answered]
    for item in failed:
        log(WARNING, "fedct: the champion %s did not reach node %s: %s", version, item["node_id"], item["reason"])
    delivery = {"champion": version, "content_sha256": digest, "sites": dict(sorted(stored.items())), "failed": failed}
    run_dir = config.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DELIVERY_NAME).write_text(json.dumps(delivery, indent=2))
    return delivery


def _wait_for_nodes(grid: Grid, minimum: int, *, timeout_s: float, poll_s: float) -> list[int]:
    """Connected node ids once ``minimum`` are connected, else those connected at the timeout."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() >= deadline:
            return nodes
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
