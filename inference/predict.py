"""Prediction on new CT studies with a model bundle: one folder of results per study, for clinicians.

``run_predict(model_dir, input_dir, out_dir)`` reads every series under ``input_dir`` with the same discovery and
validation as training (:mod:`preprocessing.discover`, :mod:`preprocessing.validate`), keeps one series per study
(the one with the most slices, as ingestion does), builds the model input with the preprocessing recorded in the
bundle (deterministic transforms only: exactly what training saw) and writes::

    OUT/summary.json                     every result in brief, and every refused file or series with its reason
    OUT/<study_key>/prediction.json      the StudyResult (machine-readable)
    OUT/<study_key>/report.html          the clinician's report (self-contained)
    OUT/<study_key>/local_identity.json  site-local: accession number, patient name and ID, for the pages
    OUT/<study_key>/overlay-sliceNNNN.png  Grad-CAM heat maps on the key axial slices
    OUT/<study_key>/sr.dcm, sc_NN.dcm    DICOM SR + Secondary Captures (when inference.dicom_export is installed)

``study_key`` is a keyed pseudonym (the site's ``site.key``, the same id ingestion uses) when a site folder is
given, else a short hash of the StudyInstanceUID: folder names never carry patient data. Inside the files the UIDs
are kept: the results stay in the hospital and must be linked back to the study.

Local identifiers (:mod:`inference.local_identity`): the accession number, patient name and patient ID are read from
the chosen series' header and written only into the site-local files a reader uses to find the patient
(``local_identity.json``, ``report.html``, and the SR / Secondary Captures that go back to the same PACS); never into
``prediction.json``, ``summary.json``, names or messages. With ``local_identifiers=False`` (a research copy) they
are not read, every file says so, and the DICOM objects carry no patient or study identification either.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import apply_transform

from inference.local_identity import (
    HIDDEN,
    LOCAL_IDENTITY_NAME,
    SHOWN,
    LocalIdentity,
    read_local_identity,
    write_local_identity,
)
from inference.profile_view import profile_record, profile_tensor
from models.bundle import bundle_pipeline, load_bundle
from models.calibration import bundle_temperature
from models.factory import MultiTaskNet, as_plain_tensor, covariate_vector
from models.ood import OodReference, bundle_ood
from models.registry import LOG_NAME, ModelRegistry, read_stamp
from preprocessing.deid import KEY_FILE_NAME, Pseudonymizer
from preprocessing.discover import discover, read_dicom
from preprocessing.profile import ProfileSchema, read_schema
from preprocessing.profile_features import ProfileNormalisation, SiteProfile
from preprocessing.transforms import PipelineConfig, deterministic_transforms
from preprocessing.validate import SeriesInvalid, ValidatedSeries, series_by_study, validate_series
from preprocessing.volume import series_to_dict

__all__ = [
    "PREDICTION_NAME",
    "SUMMARY_NAME",
    "RISK_GROUPS",
    "ModelInput",
    "PredictSummary",
    "StudyResult",
    "covariates_from_header",
    "prepare_input",
    "risk_group",
    "risk_quantiles",
    "run_predict",
    "study_key",
]

PREDICTION_NAME = "prediction.json"
SUMMARY_NAME = "summary.json"
#: Risk groups from the tertiles of the training population's risk score; "unavailable" without a reference.
RISK_GROUPS = ("low", "intermediate", "high")
RISK_UNAVAILABLE = "unavailable"
#: Attributes of the series record that identify the patient: left out of prediction.json.
_SERIES_IDENTIFIERS = ("PatientID", "AccessionNumber", "PatientName")
#: Files of an earlier run that may hold identifiers: removed before a research copy is written over it.
_IDENTIFYING_LEFTOVERS = (LOCAL_IDENTITY_NAME, "sr.dcm", "sc_*.dcm")


@dataclass(frozen=True)
class StudyResult:
    """The model's output for one study, and what was shown to the clinician.

    ``key_slices`` are 0-based indices into ``series["paths"]`` (slices sorted along the slice normal), one per
    overlay, strongest heat first; ``key_slice_positions_mm`` their positions along the slice normal (the patient
    z coordinate for an axial series). ``risk_quantiles`` are the bundle's tertile cut points (None without one).
    """

    StudyInstanceUID: str
    SeriesInstanceUID: str
    series: dict[str, Any]
    study_key: str
    probabilities: dict[str, float]
    diagnosis: str
    risk_score: float
    risk_group: str
    model: dict[str, Any]
    created_utc: str
    overlays: tuple[Path, ...] = ()
    key_slices: tuple[int, ...] = ()
    key_slice_positions_mm: tuple[float, ...] = ()
    risk_quantiles: tuple[float, float] | None = None
    covariates: dict[str, Any] | None = None
    #: The clinical/molecular profile the model fused (:func:`inference.profile_view.profile_record`): values used,
    #: missing ones, each value's contribution; None for a model without profile fusion.
    profile: dict[str, Any] | None = None
    explanation: dict[str, Any] = field(default_factory=dict)
    #: ``site-local``: the study's identifiers were kept in the site-local files; ``hidden``: a research copy.
    local_identifiers: str = SHOWN
    #: How far the study's pooled image features lie from the training studies' (:mod:`models.ood`):
    #: ``{"distance", "threshold", "quantile", "flagged"}``; None for a bundle without a reference (it says nothing).
    out_of_distribution: dict[str, Any] | None = None

    def to_dict(self, *, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-friendly form (``series`` without PatientID or AccessionNumber); overlay paths relative to
        ``relative_to`` when given."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "overlays":
                value = [_relative(Path(p), relative_to) for p in value]
            elif f.name == "series":  # no patient id beyond the UIDs: identifiers live in local_identity.json only
                value = {k: v for k, v in value.items() if k not in _SERIES_IDENTIFIERS}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return _finite(out)


@dataclass(frozen=True)
class PredictSummary:
    """What :func:`run_predict` produced: one result per predicted study, and every refusal."""

    results: tuple[StudyResult, ...]
    refused: tuple[dict[str, str], ...]
    out_dir: Path
    errors: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class ModelInput:
    """A series prepared for the model, with what is needed to map a heat map back to the CT.

    ``image`` (1, C, X, Y, Z) is the model input; ``grid`` the same image as a MetaTensor carrying the applied
    (invertible) operations; ``transforms`` the transform instances that produced it; ``hu``/``affine`` the HU
    volume (Columns, Rows, slices) and its voxel->RAS affine as :func:`preprocessing.volume.read_hu_volume` gives.
    """

    image: torch.Tensor
    grid: MetaTensor
    transforms: tuple[Any, ...]
    hu: np.ndarray
    affine: np.ndarray


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return path.resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)


def _finite(value: Any) -> Any:
    """JSON has no NaN: a non-finite number becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- bundle metadata -----------------------------------------------------------------------------------------------


def risk_quantiles(meta: Mapping[str, Any], *, source: str = "model.json") -> tuple[float, float] | None:
    """The tertile cut points ``meta["risk_reference"]["quantiles"]``; None when the bundle has no reference.

    Raises ValueError naming ``source`` when a reference is present but is not two increasing finite numbers.
    """
    reference = meta.get("risk_reference")
    if reference is None:
        return None
    quantiles = reference.get("quantiles") if isinstance(reference, Mapping) else None
    try:
        q1, q2 = (float(q) for q in quantiles)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"{source}: risk_reference.quantiles must be two numbers [q1, q2], got {quantiles!r}"
        ) from None
    if not (math.isfinite(q1) and math.isfinite(q2) and q1 <= q2):
        raise ValueError(f"{source}: risk_reference.quantiles must be finite and increasing, got {quantiles!r}")
    return q1, q2


def risk_group(score: float, quantiles: tuple[float, float] | None) -> str:
    """``low`` below the first tertile cut, ``high`` at or above the second, else ``intermediate``."""
    if quantiles is None or not math.isfinite(score):
        return RISK_UNAVAILABLE
    q1, q2 = quantiles
    if score < q1:
        return "low"
    if score < q2:
        return "intermediate"
    return "high"


def model_info(meta: Mapping[str, Any], *, stamp: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Identification of the model for results: name, fedct version, bundle date, round of the weights, and the
    calibration temperature its probabilities carry (1.0: uncalibrated); with the bundle's registry record
    (``stamp``, :func:`models.registry.read_stamp`) also its registry version and content hash."""
    provenance = meta.get("provenance") or {}
    registry = (
        {"registry_version": str(stamp["version"]), "content_sha256": str(stamp.get("content_sha256", ""))}
        if stamp
        else {}
    )
    return {
        "name": str(meta.get("model", {}).get("name", "unknown")),
        "fedct_version": str(meta.get("fedct_version", "unknown")),
        "created_utc": str(meta.get("created_utc", "")),
        "round_of_weights": provenance.get("round_of_weights"),
        "temperature": bundle_temperature(meta),
        "calibrated": bool((meta.get("calibration") or {}).get("temperature")),
        **registry,
    }


def resolve_model_dir(model_dir: Path) -> Path:
    """The bundle folder to predict with: ``model_dir`` itself, or, for a model registry folder (``log.jsonl``), its
    champion, or, for a site's work folder, the champion the coordinator sent it (``fl_client.champion``; content
    hash checked in both cases)."""
    model_dir = Path(model_dir)
    from fl_client.champion import CHAMPION_POINTER, MODELS_DIR, site_champion

    if (model_dir / MODELS_DIR / CHAMPION_POINTER).is_file() and not (model_dir / "model.json").is_file():
        return site_champion(model_dir)
    if (model_dir / LOG_NAME).is_file() and not (model_dir / "model.json").is_file():
        return ModelRegistry(model_dir).bundle_path("champion")
    return model_dir


# --- study ids -----------------------------------------------------------------------------------------------------


def study_key(study_uid: str, *, site_key: bytes | None = None) -> str:
    """Folder-safe id of a study: the site's keyed pseudonym when a key is given, else a short SHA-256 of the UID."""
    if site_key is not None:
        return Pseudonymizer(site_key)("study", study_uid)
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def _load_site_key(site_dir: Path) -> bytes:
    """The existing key of a site folder (never created here: pseudonyms must match ingestion's)."""
    path = Path(site_dir) / KEY_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no site key {path}: run `fedct ingest` for this site first, or leave out the site folder"
        )
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"site key {path} is shorter than 32 bytes")
    return key


# --- model input ---------------------------------------------------------------------------------------------------


def prepare_input(series: ValidatedSeries, pipeline: PipelineConfig) -> ModelInput:
    """Run the bundle's deterministic preprocessing on one series (what training cached), keeping the metadata.

    Raises :class:`SeriesInvalid` when a slice cannot be decoded (as ingestion would refuse it).
    """
    transforms = tuple(deterministic_transforms(pipeline, hu_key="hu"))
    data: dict[str, Any] = {"image": series_to_dict(series)}
    hu: np.ndarray | None = None
    affine: np.ndarray | None = None
    grid: MetaTensor | None = None
    for index, transform in enumerate(transforms):
        try:
            data = apply_transform(transform, data)
        except Exception as exc:  # MONAI wraps the error of a transform; the ingestion reason is inside
            raise _series_invalid(exc) from exc
        image = data["image"]
        if isinstance(image, MetaTensor):
            if index == 0:  # the loader also keeps the full HU volume in read_hu_volume's layout
                hu = data["hu"].as_tensor()[0].numpy()
                affine = data["hu"].affine.numpy().astype(np.float64)
            grid = image
    if hu is None or affine is None or grid is None:
        raise RuntimeError("the preprocessing pipeline did not produce a MetaTensor (LoadResampledCTd first?)")
    image = torch.as_tensor(data["image"], dtype=torch.float32)
    return ModelInput(image=image[None], grid=grid, transforms=transforms, hu=hu, affine=affine)


def _series_invalid(exc: BaseException) -> SeriesInvalid:
    """The SeriesInvalid inside a (MONAI-wrapped) exception, else a ``preprocessing_failed`` one."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, SeriesInvalid):
            return seen
        seen = seen.__cause__ or seen.__context__
    return SeriesInvalid("preprocessing_failed", f"{type(exc).__name__}: {exc}")


def _parse_age(value: Any) -> float:
    """DICOM Age String (``063Y``, ``006M``, ``010W``, ``020D``) in years; NaN when absent or malformed."""
    text = str(value or "").strip().upper()
    units = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
    if len(text) >= 2 and text[-1] in units and text[:-1].isdigit():
        return int(text[:-1]) / units[text[-1]]
    return float("nan")


def covariates_from_header(path: str | Path) -> tuple[float, float]:
    """(age in years, sex 1 = M / 0 = F) from a file's PatientAge/PatientSex; NaN for what is unknown."""
    try:
        ds = read_dicom(path, stop_before_pixels=True)
    except Exception:  # an unreadable header gives unknown covariates, not a failure
        return float("nan"), float("nan")
    sex = {"M": 1.0, "F": 0.0}.get(str(ds.get("PatientSex", "") or "").strip().upper(), float("nan"))
    return _parse_age(ds.get("PatientAge")), sex


# --- run -----------------------------------------------------------------------------------------------------------


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def _series_folder(paths: Sequence[str], root: Path) -> str:
    common = Path(os.path.commonpath(list(paths)))
    return _rel(str(common if common.is_dir() else common.parent), root)


def _refusal(path: str, reason: str, message: str, study_uid: str = "") -> dict[str, str]:
    entry = {"path": path, "reason": reason, "message": message}
    if study_uid:
        entry["StudyInstanceUID"] = study_uid
    return entry


def select_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but no CUDA GPU is available to PyTorch")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False))
    tmp.replace(path)


def predict_study(
    model: MultiTaskNet,
    prepared: ModelInput,
    *,
    class_names: Sequence[str],
    device: torch.device,
    covariates: torch.Tensor | None = None,
    temperature: float = 1.0,
    profile: torch.Tensor | None = None,
) -> tuple[dict[str, float], float]:
    """Class probabilities and risk score of one prepared study (eval mode, no gradients).

    The probabilities are calibrated: ``softmax(logits / temperature)`` with the bundle's temperature
    (:func:`models.calibration.bundle_temperature`; 1.0 leaves the network's softmax).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    model.eval()
    with torch.no_grad():
        # Plain tensor into the network (as in training, fl_client.train.forward); prepared.grid keeps the metadata.
        output = model(
            as_plain_tensor(prepared.image).to(device),
            None if covariates is None else covariates.to(device),
            None if profile is None else profile.to(device),
        )
    probs = torch.softmax(output.logits.float() / float(temperature), dim=1)[0].cpu().tolist()
    if len(probs) != len(class_names):
        raise ValueError(f"the model has {len(probs)} outputs but the bundle names {len(class_names)} classes")
    return dict(zip(class_names, (float(p) for p in probs))), float(output.risk[0].cpu())


def run_predict(
    model_dir: Path,
    input_dir: Path,
    out_dir: Path,
    *,
    device: str = "auto",
    progress: bool = True,
    site_dir: Path | None = None,
    dicom_export: bool = True,
    local_identifiers: bool = True,
    profile_dir: Path | None = None,
) -> PredictSummary:
    """Predict every study under ``input_dir`` with the bundle in ``model_dir``; write results into ``out_dir``.

    ``site_dir`` (optional): a site folder whose ``site.key`` names the study folders with ingestion's pseudonyms.
    ``dicom_export``: also write DICOM SR + Secondary Captures when :mod:`inference.dicom_export` is installed.
    ``local_identifiers``: read the accession number, patient name and ID of each study for the site-local report,
    review page and DICOM results; False writes a research copy (none of them read or written anywhere).
    ``profile_dir``: the folder of the site's profile export (``profile-mapping.toml`` and its table, the same as for
    training, e.g. ``FEDCT_PROFILE_DIR``); for a bundle that fuses the profile each study's row is looked up by its
    StudyInstanceUID or AccessionNumber and normalised with the bundle's statistics. Without it (or without a row)
    every profile variable is missing, and the pages say so.
    Refused files and series are listed in ``OUT/summary.json`` with ingestion's reason codes; the run goes on.
    """
    from inference.explain import GradCamExplainer, explain_study  # matplotlib etc. only when predicting
    from inference.report import write_report

    model_dir, input_dir, out_dir = Path(model_dir), Path(input_dir).resolve(), Path(out_dir).resolve()
    if not input_dir.is_dir():
        raise FileNotFoundError(f"DICOM input folder does not exist: {input_dir}")
    if out_dir == input_dir or input_dir in out_dir.parents:
        raise ValueError(
            f"output folder {out_dir} must not be inside the DICOM input folder {input_dir} (inputs stay untouched)"
        )
    model_dir = resolve_model_dir(model_dir)
    model, meta = load_bundle(model_dir)
    stamp = read_stamp(model_dir, verify=True)  # a registered version: its files must still match its content hash
    pipeline = bundle_pipeline(meta)
    class_names = list(meta.get("class_names") or [])
    quantiles = risk_quantiles(meta, source=str(Path(model_dir) / "model.json"))
    temperature = bundle_temperature(meta, source=str(Path(model_dir) / "model.json"))
    ood = bundle_ood(meta, source=str(Path(model_dir) / "model.json"))
    info = model_info(meta, stamp=stamp)
    profile_setup = _profile_setup(model, meta, profile_dir, source=str(Path(model_dir) / "model.json"))
    site_key = _load_site_key(site_dir) if site_dir is not None else None
    torch_device = select_device(device)
    model = model.to(torch_device).eval()
    explainer = GradCamExplainer(model, model_name=info["name"], input_size=pipeline.input_size)
    export = None
    if dicom_export and importlib.util.find_spec("inference.dicom_export") is not None:
        export = importlib.import_module("inference.dicom_export").write_dicom_results
    out_dir.mkdir(parents=True, exist_ok=True)

    found = discover(input_dir, progress=False)
    refused: list[dict[str, str]] = [_refusal(r.path, r.reason, r.message) for r in found.rejected]
    validated: list[ValidatedSeries] = []
    for uid, headers in found.series.items():
        try:
            series = validate_series(headers)
        except SeriesInvalid as exc:
            where = _rel(exc.path, input_dir) if exc.path else _series_folder([h.path for h in headers], input_dir)
            message = f"series {uid} ({len(headers)} files) refused: {exc.message}"
            refused.append(_refusal(where, exc.reason, message, headers[0].StudyInstanceUID))
            continue
        validated.append(series)

    results: list[StudyResult] = []
    errors: list[dict[str, str]] = []
    written: dict[str, list[str]] = {}
    studies = list(series_by_study(validated).items())  # one series per study, the rule ingestion uses
    bar = _progress(studies, enabled=progress)
    for study_uid, candidates in bar:
        chosen: ValidatedSeries | None = None
        prepared: ModelInput | None = None
        for series in candidates:
            if chosen is not None:  # one series per study, like ingestion: the others are listed, not used
                refused.append(
                    _refusal(
                        _series_folder(series.paths, input_dir),
                        "additional_series",
                        f"study {study_uid} already uses series {chosen.SeriesInstanceUID} ({len(chosen.paths)} slices); "
                        f"series {series.SeriesInstanceUID} ({len(series.paths)} slices) is not used",
                        study_uid,
                    )
                )
                continue
            try:
                prepared = prepare_input(series, pipeline)
                chosen = series
            except SeriesInvalid as exc:
                where = _rel(exc.path, input_dir) if exc.path else _series_folder(series.paths, input_dir)
                message = f"series {series.SeriesInstanceUID} ({len(series.paths)} slices) refused: {exc.message}"
                refused.append(_refusal(where, exc.reason, message, study_uid))
        if chosen is None or prepared is None:
            continue
        key = study_key(study_uid, site_key=site_key)
        identity = _local_identity(chosen) if local_identifiers else None
        if not local_identifiers:  # a research copy written over an earlier run keeps none of its identifiers
            _remove_identifying_leftovers(out_dir / key)
        result, explain_error = _predict_one(
            model,
            explainer,
            chosen,
            prepared,
            class_names=class_names,
            device=torch_device,
            quantiles=quantiles,
            temperature=temperature,
            info=info,
            key=key,
            out_dir=out_dir,
            explain_study=explain_study,
            local_identifiers=SHOWN if local_identifiers else HIDDEN,
            profile_setup=profile_setup,
            ood=ood,
        )
        if explain_error is not None and identity is not None:  # a library's message may quote a header value
            explain_error = identity.redact(explain_error)
        if explain_error is not None:  # the prediction stands; the report says there is no heat map
            errors.append({"study_key": result.study_key, "stage": "explain", "message": explain_error})
            _say(f"{result.study_key}: {explain_error}")
        study_dir = out_dir / result.study_key
        write_report(result, study_dir, identity=identity)
        files = [str(p) for p in result.overlays] + [str(study_dir / "report.html")]
        if identity is not None:
            files.append(str(write_local_identity(identity, study_dir)))
        if export is not None:
            try:
                files += [str(p) for p in export(result, study_dir, identifiers=local_identifiers)]
            except Exception as exc:  # the prediction stands; the DICOM copy is reported as failed
                message = f"DICOM export failed: {type(exc).__name__}: {exc}"
                message = identity.redact(message) if identity is not None else message  # summary.json is shared
                errors.append({"study_key": result.study_key, "stage": "dicom_export", "message": message})
                _say(f"{result.study_key}: {message}")
        _write_json(study_dir / PREDICTION_NAME, result.to_dict(relative_to=study_dir))
        written[result.study_key] = [PREDICTION_NAME] + [_relative(Path(f), study_dir) for f in files]
        results.append(result)
        del prepared

    summary = PredictSummary(tuple(results), tuple(refused), out_dir, tuple(errors))
    _write_json(
        out_dir / SUMMARY_NAME,
        _summary_json(
            summary,
            info=info,
            files=written,
            n_files=found.n_files,
            local_identifiers=SHOWN if local_identifiers else HIDDEN,
        ),
    )
    return summary


@dataclass(frozen=True)
class ProfileSetup:
    """What prediction needs for a bundle that fuses the profile: the bundle's normalisation, the schema, and the
    site's profile table (None: no ``profile_dir`` given, every variable missing)."""

    normalisation: ProfileNormalisation
    schema: ProfileSchema
    table: SiteProfile | None
    source: str

    def values_for(self, series: Mapping[str, Any]) -> np.ndarray:
        """(V,) schema-unit values of the study (NaN where missing; all NaN without a table or a row)."""
        if self.table is None:
            return np.full(len(self.schema.variables), np.nan)
        return self.table.values_for(series)


def _profile_setup(
    model: MultiTaskNet, meta: Mapping[str, Any], profile_dir: Path | None, *, source: str
) -> ProfileSetup | None:
    """The profile setup of a bundle that fuses one (None otherwise). A fused bundle without its normalisation, or
    whose variables are not the shipped schema's, is refused (BundleError); so is an unusable profile export."""
    from models.bundle import BundleError

    if not model.n_profile:
        return None
    if not model.uses_image:
        raise BundleError(
            f'{source}: a profile-only model (profile-fusion = "only") is a benchmark baseline without an '
            "image branch; fedct predict reports CT models only"
        )
    try:
        normalisation = ProfileNormalisation.from_dict(meta.get("profile_normalisation") or {})
    except ValueError as exc:
        raise BundleError(f"{source}: the model fuses a profile but its normalisation is unusable ({exc})") from None
    schema = read_schema()
    if normalisation.variables != schema.names or 2 * len(schema.names) != model.n_profile:
        raise BundleError(f"{source}: the model's profile variables are not those of {schema.name} v{schema.version}")
    table = SiteProfile.read(Path(profile_dir), schema) if profile_dir is not None else None
    if profile_dir is not None and table is None:
        raise FileNotFoundError(f"profile folder {profile_dir} holds no profile-mapping.toml")
    where = (
        "the site's profile export (site-local)"
        if table is not None
        else "no profile export given: every value missing"
    )
    return ProfileSetup(normalisation=normalisation, schema=schema, table=table, source=where)


def _local_identity(series: ValidatedSeries) -> LocalIdentity:
    """The identifiers in the chosen series' first file; empty when its header cannot be read again (the study's
    prediction stands, the pages say "not recorded")."""
    try:
        return read_local_identity(series.paths[0])
    except Exception:  # noqa: BLE001 - a vanished or unreadable file must not cost the study its prediction
        return LocalIdentity()


def _remove_identifying_leftovers(study_dir: Path) -> None:
    if not study_dir.is_dir():
        return
    for pattern in _IDENTIFYING_LEFTOVERS:
        for path in study_dir.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def _predict_one(
    model: MultiTaskNet,
    explainer: Any,
    series: ValidatedSeries,
    prepared: ModelInput,
    *,
    class_names: Sequence[str],
    device: torch.device,
    quantiles: tuple[float, float] | None,
    temperature: float,
    info: dict[str, Any],
    key: str,
    out_dir: Path,
    explain_study: Any,
    local_identifiers: str = SHOWN,
    profile_setup: ProfileSetup | None = None,
    ood: OodReference | None = None,
) -> tuple[StudyResult, str | None]:
    """Predict one study and explain it; a failure of the heat map is returned as a message, not raised."""
    covariates = None
    covariate_record = None
    if model.n_covariates:
        age, sex = covariates_from_header(series.paths[0])
        covariates = covariate_vector(torch.tensor([age]), torch.tensor([sex]))
        covariate_record = {
            "age_years": None if math.isnan(age) else round(age, 2),
            "sex": None if math.isnan(sex) else ("M" if sex == 1.0 else "F"),
            "source": "DICOM PatientAge/PatientSex; unknown values are masked, not guessed",
        }
    profile = profile_values = None
    if profile_setup is not None:
        profile_values = profile_setup.values_for(series_to_dict(series))
        profile = profile_tensor(profile_setup.normalisation, profile_values)
    probabilities, risk = predict_study(
        model,
        prepared,
        class_names=class_names,
        device=device,
        covariates=covariates,
        temperature=temperature,
        profile=profile,
    )
    diagnosis = max(probabilities, key=probabilities.__getitem__)
    profile_section = None
    if profile_setup is not None:
        profile_section = profile_record(
            model,
            prepared.image,
            profile_values,
            normalisation=profile_setup.normalisation,
            schema=profile_setup.schema,
            class_index=list(class_names).index(diagnosis),
            temperature=temperature,
            covariates=covariates,
            source=profile_setup.source,
        )
    study_dir = out_dir / key
    study_dir.mkdir(parents=True, exist_ok=True)
    error = None
    try:
        explained = explain_study(
            explainer,
            prepared,
            class_index=list(class_names).index(diagnosis),
            covariates=covariates,
            series=series,
            out_dir=study_dir,
            class_label=diagnosis,
            profile=profile,
        )
        overlays, slices, positions, explanation = (
            explained.overlays,
            explained.key_slices,
            explained.positions_mm,
            explained.info,
        )
    except Exception as exc:  # noqa: BLE001 - a heat-map failure must not cost the study its prediction
        error = f"heat map failed: {type(exc).__name__}: {exc}"
        overlays, slices, positions, explanation = (), (), (), {"error": error}
    result = StudyResult(
        StudyInstanceUID=series.StudyInstanceUID,
        SeriesInstanceUID=series.SeriesInstanceUID,
        series=series_to_dict(series),
        study_key=key,
        probabilities=probabilities,
        diagnosis=diagnosis,
        risk_score=risk,
        risk_group=risk_group(risk, quantiles),
        model=dict(info),
        created_utc=_now_utc(),
        overlays=tuple(overlays),
        key_slices=tuple(slices),
        key_slice_positions_mm=tuple(positions),
        risk_quantiles=quantiles,
        covariates=covariate_record,
        profile=profile_section,
        explanation=dict(explanation),
        local_identifiers=local_identifiers,
        out_of_distribution=None if ood is None else ood_record(model, prepared, ood, device=device),
    )
    return result, error


def ood_record(model: MultiTaskNet, prepared: ModelInput, ood: OodReference, *, device: torch.device) -> dict[str, Any]:
    """The study's distance from the training studies' image features (:meth:`models.ood.OodReference.distance`) and
    whether it lies above the bundle's threshold (prediction.json ``out_of_distribution``)."""
    model.eval()
    with torch.no_grad():
        features = model.backbone(as_plain_tensor(prepared.image).to(device)).float().cpu().numpy()[0]
    distance = ood.distance(features)
    return {
        "distance": round(distance, 4),
        "threshold": ood.threshold,
        "quantile": ood.quantile,
        "flagged": bool(distance > ood.threshold),
    }


def _summary_json(
    summary: PredictSummary,
    *,
    info: dict[str, Any],
    files: Mapping[str, list[str]],
    n_files: int,
    local_identifiers: str = SHOWN,
) -> dict[str, Any]:
    return {
        "created_utc": _now_utc(),
        "model": info,
        "n_files": n_files,
        "local_identifiers": local_identifiers,
        "results": [
            {
                "study_key": r.study_key,
                "StudyInstanceUID": r.StudyInstanceUID,
                "SeriesInstanceUID": r.SeriesInstanceUID,
                "diagnosis": r.diagnosis,
                "probabilities": r.probabilities,
                "risk_score": r.risk_score,
                "risk_group": r.risk_group,
                **({"unusual_input": bool(r.out_of_distribution["flagged"])} if r.out_of_distribution else {}),
                "folder": r.study_key,
                "files": files.get(r.study_key, []),
            }
            for r in summary.results
        ],
        "refused": list(summary.refused),
        "errors": list(summary.errors),
    }


def _progress(items: list, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, desc="studies", unit="study", disable=not enabled, file=sys.stderr)


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover - convenience: python -m inference.predict MODEL INPUT OUT
    if len(sys.argv) != 4:
        sys.exit("usage: python -m inference.predict MODEL_DIR DICOM_DIR OUT_DIR")
    s = run_predict(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    print(f"{len(s.results)} studies predicted, {len(s.refused)} refusals; see {s.out_dir / SUMMARY_NAME}")
