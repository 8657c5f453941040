"""What a site tells the server for the out-of-distribution reference (issue #23.4): aggregates only; never imports flwr.

After the last round the server sends the final model's weights twice (evaluate messages whose config has
:data:`fedct.protocol.OOD_STATISTICS`, ``fl_server.ood``):

- ``moments``: the site runs the model's backbone over its training and validation studies and replies with the count,
  the per-feature sum and the per-feature sum of squares of the pooled image features (:func:`moments_metrics`);
  with fewer studies than its privacy floor k it sends the count 0 and nothing else;
- ``distances`` (with the pooled mean and variance): the count, sum and sum of squares of log10 of each study's
  distance (:func:`models.ood.feature_distance`) for its validation and for its training studies, each only from at
  least k studies, else an empty list (:func:`distance_metrics`).

No study key, no single study's features or distance leave the site. The features are those of the global weights
exactly as the bundle holds them (not the site's own normalisation layers under ``bn-mode = local``): prediction
computes them with the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedct.protocol import (
    OOD_COUNT,
    OOD_MEAN,
    OOD_SUM,
    OOD_SUMSQ,
    OOD_TRAIN_LOG,
    OOD_VAL_LOG,
    OOD_VAR,
    RoundSettings,
)
from fl_client.config import SiteConfig
from fl_client.metrics import MIN_COUNT
from fl_client.train import _loader, _model, autocast, load_site, model_input, site_compute, site_profile
from models.factory import MultiTaskNet
from models.ood import feature_distance, feature_moments, log_moments

#: The splits whose studies the reference describes.
OOD_SPLITS = ("train", "val")


class BadOodRequest(ValueError):
    """The server's pooled mean/variance cannot be used (reason code ``bad_round_config``)."""

    code = "bad_round_config"


@torch.no_grad()
def image_features(model: MultiTaskNet, loader: Any, *, compute: Any) -> np.ndarray:
    """(n, F) pooled image features (the backbone's output, before the heads) of every study in ``loader``;
    (0, 0) for a model without an image branch."""
    if not model.uses_image:
        return np.zeros((0, 0))
    model.eval()
    parts = []
    for batch in loader:
        with autocast(compute, compute.device):
            features = model.backbone(model_input(batch["image"], compute.device, channels_last=compute.channels_last))
        parts.append(features.float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def site_features(site: SiteConfig, settings: RoundSettings, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The pooled image features of the global weights ``state`` on the site's training and validation splits."""
    settings = site.admit(settings)
    compute = site_compute(site)
    manifest = load_site(site, settings)
    model = _model(settings, {k: torch.as_tensor(v) for k, v in state.items()}, compute)
    profile = site_profile(site, settings)
    return {
        split: image_features(
            model,
            _loader(manifest, split, settings, train=False, compute=compute, profile=profile),
            compute=compute,
        )
        for split in OOD_SPLITS
    }


def floor_moments(features: np.ndarray, *, min_count: int = MIN_COUNT) -> dict[str, Any]:
    """The reply of the ``moments`` request for ``features`` (n, F): count, sums and sums of squares, or only the
    count 0 when ``n`` is below ``min_count``."""
    if features.size == 0 or features.shape[0] < min_count:
        return {OOD_COUNT: 0}
    n, total, squares = feature_moments(features)
    return {OOD_COUNT: int(n), OOD_SUM: [float(v) for v in total], OOD_SUMSQ: [float(v) for v in squares]}


def moments_metrics(
    site: SiteConfig, settings: RoundSettings, state: Mapping[str, Any], *, min_count: int = MIN_COUNT
) -> dict[str, Any]:
    """The site's feature moments over its training and validation studies (:func:`floor_moments`)."""
    features = [f for f in site_features(site, settings, state).values() if f.size]
    return floor_moments(np.concatenate(features) if features else np.zeros((0, 0)), min_count=min_count)


def requested_reference(config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The pooled mean and variance of a ``distances`` request; :class:`BadOodRequest` when they are not two lists
    of the same length of finite numbers (variance >= 0)."""
    try:
        mean = np.asarray([float(v) for v in config[OOD_MEAN]], dtype=np.float64)
        var = np.asarray([float(v) for v in config[OOD_VAR]], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise BadOodRequest(f"a distances request carries {OOD_MEAN} and {OOD_VAR} as lists of numbers") from None
    if not len(mean) or mean.shape != var.shape or not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise BadOodRequest("the pooled feature mean and variance must be finite lists of the same length")
    if (var < 0).any():
        raise BadOodRequest("the pooled feature variance must be >= 0")
    return mean, var


def floor_distances(
    features: Mapping[str, np.ndarray], mean: np.ndarray, var: np.ndarray, *, min_count: int = MIN_COUNT
) -> dict[str, Any]:
    """The reply of the ``distances`` request: per split, ``[studies, sum, sum of squares]`` of log10(distance)
    (:func:`models.ood.log_moments`), or an empty list (fewer than ``min_count`` studies, or no image branch)."""
    out: dict[str, Any] = {}
    for split, key in (("val", OOD_VAL_LOG), ("train", OOD_TRAIN_LOG)):
        values = features.get(split, np.zeros((0, 0)))
        if values.size and values.shape[1] != len(mean):
            raise BadOodRequest(f"the pooled mean has {len(mean)} features, this model {values.shape[1]}")
        enough = values.size and values.shape[0] >= min_count
        out[key] = log_moments(np.maximum(feature_distance(values, mean, var), 1e-12)) if enough else []
    return out


def distance_metrics(
    site: SiteConfig,
    settings: RoundSettings,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """The site's log-distance moments under the pooled reference of the request ``config`` (:func:`floor_distances`)."""
    mean, var = requested_reference(config)
    return floor_distances(site_features(site, settings, state), mean, var, min_count=min_count)
