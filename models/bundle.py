"""The model bundle: the global model on disk with what is needed to use it, read by the server and by inference.

A bundle is a folder with ``model.pt`` (a PyTorch state dict), ``model.json`` (architecture, preprocessing
pipeline with its version, class names, training provenance), ``model_card.md`` and ``configs/metadata.json`` (MONAI
bundle metadata with the network's data format, so MONAI's bundle tools can read the model).
:func:`load_bundle` refuses a bundle whose architecture or preprocessing pipeline version does not match this code,
with the reason, instead of running a stale model on a changed pipeline.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedct.files import atomic_write_bytes, json_safe
from models.factory import ModelConfig, build_model
from preprocessing.labels import DIAGNOSES
from preprocessing.profile_features import ProfileNormalisation
from preprocessing.transforms import PIPELINE_VERSION, PipelineConfig

__all__ = [
    "BUNDLE_FORMAT",
    "BundleError",
    "bundle_pipeline",
    "load_bundle",
    "model_card",
    "monai_metadata",
    "save_state",
    "set_calibration",
    "set_ood",
    "write_bundle",
]

BUNDLE_FORMAT = "fedct-model/1"
#: Where MONAI's bundle layout keeps the metadata.
MONAI_METADATA = Path("configs") / "metadata.json"


class BundleError(ValueError):
    """A folder that is not a usable bundle for this code: not a bundle, another format, another architecture or
    another preprocessing pipeline version. The message names the bundle and the reason."""


def save_state(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Write a state dict atomically (a crash never leaves a half-written checkpoint)."""
    buffer = io.BytesIO()
    torch.save({k: torch.as_tensor(v).clone() for k, v in state.items()}, buffer)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def write_bundle(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    *,
    model: ModelConfig,
    pipeline: PipelineConfig,
    provenance: Mapping[str, Any],
    risk_reference: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    profile_normalisation: ProfileNormalisation | None = None,
) -> Path:
    """Write ``model.pt``, ``model.json`` and ``model_card.md`` into ``folder``; return the folder.

    ``risk_reference`` (``{"quantiles": [low/intermediate cut, intermediate/high cut], ...}``) places a new
    patient's risk score relative to the training population. ``calibration`` (``{"temperature": T, ...}``, see
    ``models.calibration``): inference reports ``softmax(logits / T)``; None: uncalibrated (T = 1).
    ``profile_normalisation``: the pooled profile means/SDs a profile-fusion model was trained with (required then:
    prediction must scale a study's profile exactly as training did).
    """
    folder = Path(folder)
    if (model.profile_fusion != "none") != (profile_normalisation is not None):
        raise ValueError(
            f"{folder}: a model with profile-fusion {model.profile_fusion!r} needs its profile normalisation "
            "in the bundle exactly when it fuses a profile"
        )
    save_state(folder / "model.pt", state)
    from importlib.metadata import PackageNotFoundError, version

    try:
        fedct_version = version("fedct")
    except PackageNotFoundError:
        fedct_version = "unknown"
    meta = {
        "format": BUNDLE_FORMAT,
        "fedct_version": fedct_version,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": asdict(model),
        "pipeline": pipeline.to_dict(),
        "class_names": list(DIAGNOSES[: model.num_classes]),
        "provenance": dict(provenance),
        "risk_reference": dict(risk_reference) if risk_reference else None,
        "calibration": _checked_calibration(calibration, folder),
    }
    if profile_normalisation is not None:
        meta["profile_normalisation"] = profile_normalisation.to_dict()
    _write_meta(folder, meta)
    return folder


def _checked_calibration(calibration: Mapping[str, Any] | None, folder: Path) -> dict[str, Any] | None:
    if not calibration:
        return None
    t = calibration.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < math.inf):
        raise ValueError(f"{folder}: calibration temperature must be a positive finite number, got {t!r}")
    return dict(calibration)


def _write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    atomic_write_bytes(
        folder / "model.json", json.dumps(json_safe(meta), indent=2, default=str, allow_nan=False).encode()
    )
    atomic_write_bytes(folder / "model_card.md", model_card(meta).encode())
    atomic_write_bytes(folder / MONAI_METADATA, json.dumps(monai_metadata(meta), indent=2).encode())


def set_calibration(folder: Path, calibration: Mapping[str, Any] | None) -> Path:
    """Replace the calibration of an existing bundle (``model.json``, model card); the weights stay as they are.

    The server calls it after the last round, when the ECE before/after of the bundle's temperature is known.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"not a readable model bundle: {folder} ({exc})") from None
    meta["calibration"] = _checked_calibration(calibration, folder)
    _write_meta(folder, meta)
    return folder


def set_ood(folder: Path, ood: Mapping[str, Any] | None) -> Path:
    """Set the out-of-distribution reference of an existing bundle (``model.json`` ``ood``: feature mean, variance,
    threshold and its figures, :mod:`models.ood`; None removes it) and its model card; the weights stay as they are."""
    from models.ood import OodReference

    folder = Path(folder)
    try:
        meta = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"not a readable model bundle: {folder} ({exc})") from None
    if ood:
        OodReference.from_dict(ood)  # refuses an unusable reference before it is written
        meta["ood"] = dict(ood)
    else:
        meta.pop("ood", None)
    _write_meta(folder, meta)
    return folder


def _views_line(flips: Sequence[int]) -> str:
    """How every figure and prediction of the model is computed: one view, or the mean over mirrored views."""
    if not flips:
        return "Every figure and prediction below is of one pass over the input (no test-time augmentation)."
    axes = ", ".join({0: "left-right", 1: "front-back", 2: "head-foot"}[int(a)] for a in flips)
    return (
        f"Every figure and prediction below is the mean over the input and its mirror image ({axes}): test-time "
        "augmentation; heat maps explain the input as given."
    )


def model_card(meta: Mapping[str, Any]) -> str:
    """A short model card (Markdown): intended use, training data in aggregate, metrics per site, limitations."""
    prov = meta.get("provenance", {})
    metrics = prov.get("metrics", {})
    model = meta["model"]
    pipeline = meta["pipeline"]

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "n/a"

    lines = [
        f"# Model card: fedct {model['name']} (diagnosis + prognosis)",
        "",
        f"Created {meta['created_utc']} by fedct {meta['fedct_version']}; weights of round {prov.get('round_of_weights')} "
        f"of {prov.get('rounds_planned')} ({prov.get('strategy', 'FedAvg')}).",
        "",
        "## Intended use",
        "Research decision support for chest CT: probabilities of a COVID-19-like pattern, other pneumonia or normal "
        "lungs, and a relative risk score for a severe outcome. **Not for clinical use without local validation.** "
        "It does not replace a radiologist's read.",
        "",
        "## Training data (aggregate only)",
        f"Trained federated across {len(prov.get('sites', []))} site(s): {', '.join(prov.get('sites', [])) or 'n/a'}. "
        "Studies used for training per site: "
        + (
            ", ".join(f"{s} {int(n)}" for s, n in sorted(metrics.get("training_studies", {}).items()) if n is not None)
            or "n/a"
        )
        + ". No image or patient data left the sites.",
        f"Input: single-frame or Enhanced CT, resampled to {pipeline['target_spacing_mm']} mm, HU window "
        f"[{pipeline['hu_min']}, {pipeline['hu_max']}], {pipeline['input_size']} voxels (pipeline version {pipeline['pipeline_version']}).",
        _views_line(model.get("test_time_flips") or ()),
        "",
        "## Metrics of these weights (held-out test split of each site)",
        "| site | studies | diagnosis macro AUC | accuracy | prognosis C-index |",
        "|---|---|---|---|---|",
    ]
    for site, m in sorted(metrics.get("sites", {}).items()):
        lines.append(
            f"| {site} | {int(m.get('test-n') or 0)} | {fmt(m.get('test-auc-macro'))} | {fmt(m.get('test-accuracy'))} | "
            f"{fmt(m.get('test-c-index'))} |"
        )
    agg = metrics.get("aggregate", {})
    lines.append(
        f"| all (weighted mean of sites) | {int(agg.get('test-n') or 0)} | {fmt(agg.get('test-auc-macro'))} | "
        f"{fmt(agg.get('test-accuracy'))} | {fmt(agg.get('test-c-index'))} |"
    )
    lines += _calibration_lines(meta.get("calibration"))
    lines += _ood_lines(meta.get("ood"))
    lines += _privacy_lines(prov)
    lines += [
        "",
        "## Limitations",
        "- Small per-site test splits: metrics carry wide uncertainty.",
        "- Calibration is fitted on the training sites' validation data; at another site, scanner or population the "
        "probabilities may be over- or under-confident: check them, and the operating point, locally.",
        "- Trained on the data of the listed sites only; scanners, protocols and populations elsewhere may differ.",
        "",
    ]
    return "\n".join(lines)


def _calibration_lines(calibration: Mapping[str, Any] | None) -> list[str]:
    """The model card's calibration section: the temperature, where it was fitted, ECE before/after on test."""

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"

    lines = ["", "## Calibration"]
    if not calibration or calibration.get("temperature") is None:
        reason = (calibration or {}).get("reason") or "no temperature was fitted"
        return lines + [f"Uncalibrated: the probabilities are the network's softmax ({reason})."]
    t = float(calibration["temperature"])
    lines.append(
        f"Temperature scaling: the reported probabilities are softmax(logits / {t:.3f}), T fitted on the "
        f"validation split of {len(calibration.get('sites') or []) or 'the'} site(s) "
        f"({calibration.get('validation_studies', 'n/a')} studies) from summed statistics only; the most "
        "likely class is unchanged."
    )
    if "ece_before" in calibration:
        lines.append(
            f"Expected calibration error on the held-out test split ({calibration.get('test_studies', 'n/a')} "
            f"studies, 15 confidence bins pooled across sites): {fmt(calibration.get('ece_before'))} before, "
            f"{fmt(calibration.get('ece_after'))} after; Brier score after {fmt(calibration.get('brier_after'))}."
        )
    if calibration.get("ece_floor_upper95") is not None:
        lines.append(
            "At this test size a perfectly calibrated model would read an ECE of "
            f"{fmt(calibration.get('ece_floor_expected'))} on average and up to {fmt(calibration.get('ece_floor_upper95'))} "
            "in 95 % of test sets (binomial sampling), so an ECE below that bound is consistent with calibration."
        )
    return lines


def _ood_lines(ood: Mapping[str, Any] | None) -> list[str]:
    """The model card's out-of-distribution section: how a study is flagged, the threshold and how many of the
    training sites' own studies lie above it; nothing for a bundle without a reference."""
    if not ood or ood.get("threshold") is None:
        return []
    q = 100 * float(ood.get("quantile", 0.99))
    return [
        "",
        "## Unusual inputs",
        f"A study is flagged as unlike the training studies when the distance of its pooled image features from the "
        f"training sites' mean (mean squared z-score over {ood.get('features', 'the')} features) exceeds "
        f"{float(ood['threshold']):.2f}, the upper {q:.0f} % prediction bound for a new study of a log-normal fitted "
        f"to the sites' validation studies' distances (pooled sums only, no study left its site; "
        f"{ood.get('validation_studies', 'n/a')} validation studies). Expected above it: "
        f"{_figure(ood.get('validation_above_expected'))} validation and "
        f"{_figure(ood.get('training_above_expected'))} of {ood.get('training_studies', 'n/a')} training studies "
        "(from the same fit). Not flagged does not mean in scope: the check "
        "sees only what the network's features see.",
    ]


def _figure(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def _privacy_lines(prov: Mapping[str, Any]) -> list[str]:
    """The model card's privacy section (fl_server.privacy's summary, the secure-aggregation setting), if any."""
    dp, secagg = prov.get("privacy"), bool(prov.get("run_config", {}).get("secure-aggregation"))
    if not dp and not secagg:
        return []
    lines = ["", "## Privacy"]
    if dp:
        lines.append(
            f"Client-level differential privacy: (ε = {dp['epsilon']:.3g}, δ = {dp['delta']:g}) after {dp['releases']} "
            f"noised aggregate(s), noise multiplier {dp['noise_multiplier']:g}; {dp['accountant']}. "
            "Only the weights are covered, not the metrics the sites reported."
        )
    if secagg:
        lines.append("Secure aggregation (SecAgg+): the server only saw the sum of the sites' masked updates.")
    return lines


def load_bundle(folder: Path, *, expected_model: ModelConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a bundle and load its weights; return ``(model, metadata)``.

    Refused with :class:`BundleError` naming the reason: no ``model.json``, another bundle format, a preprocessing
    pipeline version other than this code's (the model would see inputs it was not trained on), an architecture
    this code cannot build or that differs from ``expected_model``, weights whose names or shapes do not match the
    architecture.
    """
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise BundleError(f"not a model bundle (no model.json): {folder}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{meta_path} is not readable JSON: {exc}") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    version = (meta.get("pipeline") or {}).get("pipeline_version")
    if str(version) != PIPELINE_VERSION:
        raise BundleError(
            f"{folder}: the model was trained with preprocessing pipeline version {version!r}, this fedct "
            f"preprocesses with version {PIPELINE_VERSION!r}; retrain (or use a fedct of the model's "
            "version) instead of running it on inputs it never saw"
        )
    try:
        config = ModelConfig(**meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{meta_path}: architecture {meta.get('model')!r} cannot be built by this fedct: {exc}"
        ) from None
    if expected_model is not None and config.architecture != expected_model.architecture:
        raise BundleError(f"{folder}: architecture {asdict(config)} differs from the expected {asdict(expected_model)}")
    model = build_model(config)
    state = torch.load(folder / "model.pt", weights_only=True, map_location="cpu")
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise BundleError(f"{folder / 'model.pt'}: the weights do not fit architecture {config.name!r}: {problem}")
    model.load_state_dict(state)
    return model, meta


def _state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """What differs between two state dicts' names and shapes (first few of each kind), ``""`` when nothing."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = [
        f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if items
    ]
    return "; ".join(parts)


def monai_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI bundle metadata (``configs/metadata.json``) for a bundle's ``model.json`` content: versions, task and
    the network data format (input: one CT channel windowed to [0, 1] on the pipeline's grid; outputs: class
    logits and the prognostic log-risk)."""
    import monai
    import numpy

    model, pipeline = meta["model"], meta["pipeline"]
    classes = list(meta["class_names"])
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": str(meta.get("fedct_version", "unknown")),
        "changelog": {str(meta.get("fedct_version", "unknown")): f"fedct bundle written {meta.get('created_utc')}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"fedct": str(meta.get("fedct_version", "unknown"))},
        "name": f"fedct {model['name']} chest CT diagnosis + prognosis",
        "task": "Chest CT: diagnosis (" + ", ".join(classes) + ") and a relative risk of a severe outcome",
        "description": "Federated model trained by fedct. Research decision support, not for clinical use without "
        "local validation. The weights are model.pt in the bundle folder (model_file='model.pt').",
        "authors": "fedct consortium",
        "copyright": "see the consortium agreement",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [int(v) for v in pipeline["input_size"]],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                    "preprocessing": {
                        "target_spacing_mm": list(pipeline["target_spacing_mm"]),
                        "hu_window": [pipeline["hu_min"], pipeline["hu_max"]],
                        "pipeline_version": pipeline["pipeline_version"],
                    },
                },
            },
            "outputs": {
                "logits": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(classes),
                    "spatial_shape": [len(classes)],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {str(i): c for i, c in enumerate(classes)},
                },
                "risk": {
                    "type": "regression",
                    "format": "log-risk",
                    "num_channels": 1,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "risk"},
                },
            },
        },
    }


def bundle_pipeline(meta: Mapping[str, Any]) -> PipelineConfig:
    """The preprocessing recorded in a bundle's metadata."""
    p = dict(meta["pipeline"])
    p.pop("pipeline_version", None)
    return PipelineConfig(
        target_spacing_mm=tuple(p["target_spacing_mm"]),
        input_size=tuple(p["input_size"]),
        hu_min=p["hu_min"],
        hu_max=p["hu_max"],
        body_threshold_hu=p["body_threshold_hu"],
    )
