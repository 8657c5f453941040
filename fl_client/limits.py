"""What a site lets the server ask of it: caps on a round's input size, spacing, epochs, batch and memory.

Hospital IT sets them in the site env file (``FEDCT_MAX_*``, ``FEDCT_MIN_SPACING_MM``, ``FEDCT_CACHE_MAX_GB``;
sane defaults below); ``fedct site`` passes them to the ClientApp in the SuperNode's node config, and
:meth:`fl_client.config.SiteConfig.admit` checks every round's settings against them before any study is read.

A request over a limit is **refused**, never clamped: clamping the input size or spacing would change the model's
shape or what it sees, and clamping epochs or batch size would silently change the site's weight in the federated
average. The refusal is a :class:`SiteLimitError` whose ``code`` (``site_limit_exceeded``) is all the server
learns; the message, logged at the site, names the setting, the request and the site's limit.

This module imports nothing heavy (``fedct site --check`` reads it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class SiteLimitError(ValueError):
    """The server asked for more than this site allows. ``code`` is the stable reason sent to the server;
    the message (site log only) names the site env key, the request and the limit."""

    #: Stable reason code for the server (the only part of the refusal that leaves the site).
    code = "site_limit_exceeded"

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        #: The site env key of the limit that was exceeded.
        self.limit = limit


#: field name -> (node-config key, site env key, meaning). Defaults are the dataclass defaults.
LIMIT_KEYS: dict[str, tuple[str, str, str]] = {
    "max_input_size": (
        "max-input-size",
        "FEDCT_MAX_INPUT_SIZE",
        "largest model input per axis in voxels the server may ask for (default 256)",
    ),
    "max_input_voxels": (
        "max-input-voxels",
        "FEDCT_MAX_INPUT_VOXELS",
        "largest model input in voxels (x*y*z) per study (default 8388608 = 256*256*128)",
    ),
    "min_spacing_mm": (
        "min-spacing-mm",
        "FEDCT_MIN_SPACING_MM",
        "finest target voxel spacing in mm the server may ask for (default 1.0; finer resamples "
        "whole CT volumes to huge grids)",
    ),
    "max_local_epochs": ("max-local-epochs", "FEDCT_MAX_LOCAL_EPOCHS", "most local epochs per round (default 20)"),
    "max_batch_size": ("max-batch-size", "FEDCT_MAX_BATCH_SIZE", "largest batch size (default 64)"),
    "max_batch_voxels": (
        "max-batch-voxels",
        "FEDCT_MAX_BATCH_VOXELS",
        "memory budget: batch size * input voxels per training step (default 33554432; densenet121 "
        "needs ~0.7 KB of RAM per voxel on a CPU in float32, resnet18 ~1.6 KB)",
    ),
    "cache_max_gb": (
        "cache-max-gb",
        "FEDCT_CACHE_MAX_GB",
        "disk the preprocessing caches may use in GB; older pipelines' caches are removed (default 20)",
    ),
}


@dataclass(frozen=True)
class SiteLimits:
    """The site's caps on what a round may ask (see :data:`LIMIT_KEYS` for the env keys)."""

    max_input_size: int = 256
    max_input_voxels: int = 256 * 256 * 128
    min_spacing_mm: float = 1.0
    max_local_epochs: int = 20
    max_batch_size: int = 64
    max_batch_voxels: int = 2**25
    cache_max_gb: float = 20.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _, env_key, _ = LIMIT_KEYS[f.name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{env_key} must be a number > 0, got {value!r}")
            if f.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"{env_key} must be a whole number, got {value!r}")

    @property
    def cache_max_bytes(self) -> int:
        """:attr:`cache_max_gb` in bytes."""
        return int(self.cache_max_gb * 1e9)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteLimits:
        """From the node config's ``max-*`` keys (absent keys keep their defaults); errors name the env key."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            node_key, env_key, _ = LIMIT_KEYS[f.name]
            if node_key not in node_config:
                continue
            text = str(node_config[node_key]).strip()
            try:
                values[f.name] = int(text) if f.type in ("int", int) else float(text)
            except ValueError as exc:
                kind = "a whole number" if f.type in ("int", int) else "a number"
                raise ValueError(f"{env_key} ({node_key}) must be {kind}, got {text!r}") from exc
        return cls(**values)

    @classmethod
    def from_env_values(cls, values: Mapping[str, str]) -> SiteLimits:
        """From a site env file's ``KEY=VALUE`` pairs (empty or absent: default)."""
        node = {
            LIMIT_KEYS[f.name][0]: values[LIMIT_KEYS[f.name][1]]
            for f in fields(cls)
            if values.get(LIMIT_KEYS[f.name][1])
        }
        return cls.from_node_config(node)

    def node_config(self) -> dict[str, int | float]:
        """The ``--node-config`` entries that carry these limits to the ClientApp."""
        return {LIMIT_KEYS[f.name][0]: getattr(self, f.name) for f in fields(self)}

    def check(
        self, *, input_size: tuple[int, ...], spacing_mm: tuple[float, ...], local_epochs: int, batch_size: int
    ) -> None:
        """Raise :class:`SiteLimitError` for the first request over a limit (each limit its own message)."""

        def refuse(env_key: str, what: str, limit: object) -> SiteLimitError:
            return SiteLimitError(
                f"refused: the server asked for {what}, over this site's limit {env_key}={limit} "
                f"(site env file; raise it there to allow this run)",
                limit=env_key,
            )

        size_text = ",".join(str(v) for v in input_size)
        if max(input_size) > self.max_input_size:
            raise refuse("FEDCT_MAX_INPUT_SIZE", f"input-size {size_text}", self.max_input_size)
        voxels = math.prod(input_size)
        if voxels > self.max_input_voxels:
            raise refuse("FEDCT_MAX_INPUT_VOXELS", f"input-size {size_text} ({voxels} voxels)", self.max_input_voxels)
        if min(spacing_mm) < self.min_spacing_mm:
            raise refuse(
                "FEDCT_MIN_SPACING_MM", f"target-spacing-mm {','.join(str(v) for v in spacing_mm)}", self.min_spacing_mm
            )
        if local_epochs > self.max_local_epochs:
            raise refuse("FEDCT_MAX_LOCAL_EPOCHS", f"local-epochs {local_epochs}", self.max_local_epochs)
        if batch_size > self.max_batch_size:
            raise refuse("FEDCT_MAX_BATCH_SIZE", f"batch-size {batch_size}", self.max_batch_size)
        if batch_size * voxels > self.max_batch_voxels:
            raise refuse(
                "FEDCT_MAX_BATCH_VOXELS",
                f"batch-size {batch_size} x {voxels} voxels = {batch_size * voxels}",
                self.max_batch_voxels,
            )
