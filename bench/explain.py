"""Explanation benchmark: do the heat maps point at the lesions? Per method, on held-out positive studies.

A model is trained at one synthetic site (fedct's ingestion, cache and training loop: ``fl_client.train``), then for
every held-out (validation and test) study with a COVID-like or other-pneumonia diagnosis and a lesion mask written by
the generator (``<site>/lesion-masks/<StudyInstanceUID>.nii.gz``), each method's map of the *true* class is scored on
the model's input grid, where the mask is brought with the same MONAI spatial transforms as the image (orientation,
spacing, body crop and pad; nearest interpolation):

- ``pointing``: the map's maximum lies inside a lesion (hit rate; ``pointing_10mm``: within 10 mm of one);
- ``energy_ratio``: fraction of the map's (non-negative) energy inside the lesions ÷ the lesions' share of the volume
  (1 = no better than a uniform map; goal >= 3);
- ``deletion_auc``: the true class's probability as the hottest voxels are set to air (0 after windowing), in steps up
  to :data:`DELETION_MAX_FRACTION` of the volume, relative to the unaltered probability, averaged over the steps (the
  area under the normalised curve; lower = the map found what drives the prediction; compare with ``random``);
- ``seconds_per_study``: wall time of the map alone, on the device named in the result (CPU here; GPU when run on one).

Methods: MONAI's ``GradCAM`` and ``GradCAMpp`` at each layer of :data:`inference.explain.CANDIDATE_LAYERS`,
``OcclusionSensitivity``, ``SmoothGrad`` and ``GuidedBackpropGrad`` (``monai.visualize``), Guided Grad-CAM (the
product of guided backprop and Grad-CAM at each layer, both MONAI's) and a ``random`` map as the chance reference.
The method recommended for ``inference.explain`` is the best by pointing game, then energy ratio, among those that
are not slower than :data:`MAX_SECONDS_FACTOR` times the fastest Grad-CAM.

Writes ``explain.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchOptions, site_names, summarise, synthetic_sites, write_result
from synthetic.masks import LESION_MASK_DIR

#: Name of the folder (in a site's data folder) with one lesion mask per study, ``<StudyInstanceUID>.nii.gz``.
MASK_FOLDER = LESION_MASK_DIR
#: The deletion curve removes up to this fraction of the volume's voxels, hottest first, in :data:`DELETION_STEPS` steps.
DELETION_MAX_FRACTION = 0.2
DELETION_STEPS = 10
#: ``pointing_10mm``: the map's maximum within this distance of a lesion voxel.
POINTING_TOLERANCE_MM = 10.0
#: A method slower than this many times the fastest Grad-CAM is not recommended for every prediction.
MAX_SECONDS_FACTOR = 20.0
#: Goals of issue #23 (reported against, never asserted).
GOAL_POINTING = 0.8
GOAL_ENERGY_RATIO = 3.0


# --- metrics -------------------------------------------------------------------------------------------------------


def _check_pair(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat = np.asarray(heat, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if heat.shape != mask.shape:
        raise ValueError(f"heat map shape {heat.shape} differs from the lesion mask's {mask.shape}")
    if not np.isfinite(heat).all():
        raise ValueError(f"heat map has {int((~np.isfinite(heat)).sum())} non-finite value(s)")
    if not mask.any():
        raise ValueError("lesion mask is empty: no lesion to point at")
    return heat, mask


def pointing_hit(
    heat: np.ndarray, mask: np.ndarray, *, spacing_mm: Sequence[float] | None = None, tolerance_mm: float = 0.0
) -> bool:
    """True when the map's maximum lies inside the mask (or within ``tolerance_mm`` of it, ``spacing_mm`` per axis).

    A constant map has no maximum to point with: a miss.
    """
    heat, mask = _check_pair(heat, mask)
    if not heat.max() > heat.min():
        return False
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if mask[peak]:
        return True
    if tolerance_mm <= 0:
        return False
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    return bool(distance[peak] <= tolerance_mm)


def energy_ratio(heat: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the map's non-negative energy inside the mask ÷ the mask's share of the volume; None for a map
    without positive values (it points nowhere)."""
    heat, mask = _check_pair(heat, mask)
    heat = np.clip(heat, 0.0, None)
    total = float(heat.sum())
    if total <= 0:
        return None
    return float(heat[mask].sum() / total) / float(mask.mean())


def deletion_order(heat: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Flat voxel indices, hottest first; ties in random (seeded) order so that a flat map removes voxels at random."""
    heat = np.asarray(heat, dtype=np.float64).ravel()
    if not np.isfinite(heat).all():
        raise ValueError("heat map has non-finite values")
    tie = np.random.default_rng(seed).random(heat.size)
    return np.lexsort((tie, -heat))


def deletion_curve(
    probability: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    heat: np.ndarray,
    *,
    max_fraction: float = DELETION_MAX_FRACTION,
    steps: int = DELETION_STEPS,
    baseline: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(fractions, probability relative to the unaltered image, area under that curve ÷ max_fraction)``.

    ``image`` (C, X, Y, Z) and ``heat`` (X, Y, Z); ``probability`` maps a batch (N, C, X, Y, Z) to N probabilities of
    the explained class. At each step the hottest ``fraction`` of voxels is set to ``baseline`` in every channel.
    """
    if not 0 < max_fraction <= 1 or steps < 1:
        raise ValueError(f"max_fraction must be in (0, 1] and steps >= 1, got {max_fraction}, {steps}")
    image = np.asarray(image, dtype=np.float32)
    if image.shape[1:] != np.asarray(heat).shape:
        raise ValueError(f"image {image.shape} and heat map {np.asarray(heat).shape} differ in spatial shape")
    order = deletion_order(heat, seed=seed)
    fractions = np.linspace(0.0, max_fraction, steps + 1)
    batch = np.repeat(image[None], len(fractions), axis=0)
    flat = batch.reshape(len(fractions), image.shape[0], -1)
    for i, f in enumerate(fractions):
        flat[i, :, order[: int(round(f * order.size))]] = baseline
    p = np.asarray(probability(batch), dtype=np.float64)
    if p.shape != fractions.shape:
        raise ValueError(f"probability returned shape {p.shape}, expected {fractions.shape}")
    relative = p / p[0] if p[0] > 0 else np.zeros_like(p)
    auc = float(np.trapezoid(relative, fractions) / max_fraction)
    return fractions, relative, auc


# --- masks on the model grid ---------------------------------------------------------------------------------------


def image_and_mask_on_model_grid(series: Any, mask_path: Path, pipeline: Any) -> tuple[np.ndarray, np.ndarray]:
    """The model input (C, X, Y, Z) and the lesion mask (X, Y, Z, bool) on the same grid.

    The image goes through fedct's loader onto the RAS grid at the pipeline's spacing; the NIfTI mask through MONAI's
    ``Orientationd("RAS")`` + ``Spacingd`` (nearest) and, should its grid differ by rounding, ``ResampleToMatchd``
    (nearest) onto the image's; both then through the same body crop (from the image) and pad/crop to the input size.
    """
    import torch
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ResampleToMatchd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    from preprocessing.transforms import AboveThreshold
    from preprocessing.volume import LoadResampledCTd

    mask_path = Path(mask_path)
    if not mask_path.is_file():
        raise FileNotFoundError(f"lesion mask {mask_path} does not exist")
    keys = ("image", "mask")
    transforms = Compose(
        [
            LoadResampledCTd(keys="image", pixdim=pipeline.target_spacing_mm, antialias=False),
            LoadImaged(keys="mask", reader="NibabelReader", image_only=True),
            EnsureChannelFirstd(keys="mask", channel_dim="no_channel"),
            Orientationd(keys="mask", axcodes="RAS"),
            Spacingd(keys="mask", pixdim=pipeline.target_spacing_mm, mode="nearest", padding_mode="zeros"),
            ResampleToMatchd(keys="mask", key_dst="image", mode="nearest", padding_mode="zeros"),
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=AboveThreshold(pipeline.body_threshold_hu),
                margin=2,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            ),
            ScaleIntensityRanged(
                keys="image", a_min=pipeline.hu_min, a_max=pipeline.hu_max, b_min=0.0, b_max=1.0, clip=True
            ),
            ResizeWithPadOrCropd(keys=keys, spatial_size=pipeline.input_size, mode="constant", value=0.0),
        ]
    )
    out = transforms({"image": series, "mask": str(mask_path)})
    image = torch.as_tensor(out["image"]).float().numpy()
    mask = torch.as_tensor(out["mask"]).numpy()[0] > 0.5
    return image, mask


# --- methods -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One explanation method: a name, its MONAI class (or ``random``) and its settings."""

    name: str
    kind: str  # gradcam, gradcampp, guidedgradcam, occlusion, smoothgrad, guided, random
    layer: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)


def methods_for(
    model_name: str, input_size: Sequence[int], *, samples: int, occlusion_overlap: float, occlusion_divisor: int = 6
) -> tuple[Method, ...]:
    """The compared methods: Grad-CAM, Grad-CAM++ and Guided Grad-CAM at every candidate layer, occlusion (a patch
    of ``input_size / occlusion_divisor`` per axis), SmoothGrad, guided backprop and the random reference."""
    from inference.explain import CANDIDATE_LAYERS

    layers = CANDIDATE_LAYERS.get(model_name, ())
    out: list[Method] = []
    for kind, label in (("gradcam", "Grad-CAM"), ("gradcampp", "Grad-CAM++"), ("guidedgradcam", "Guided Grad-CAM")):
        out += [Method(f"{label}@{layer.removeprefix('backbone.')}", kind, layer) for layer in layers]
    mask = tuple(max(2, int(round(n / occlusion_divisor))) for n in input_size)
    out.append(Method("Occlusion", "occlusion", settings={"mask_size": mask, "overlap": occlusion_overlap}))
    out.append(Method("SmoothGrad", "smoothgrad", settings={"n_samples": samples, "stdev_spread": 0.15}))
    out.append(Method("Guided backprop", "guided"))
    out.append(Method("random", "random"))
    return tuple(out)


def make_explainer(method: Method, model: Any) -> Callable[[Any, int], np.ndarray]:
    """A function ``(image (1, C, X, Y, Z) tensor, class index) -> non-negative map (X, Y, Z)`` for ``method``."""
    import torch
    from monai.visualize import GradCAM, GradCAMpp, GuidedBackpropGrad, OcclusionSensitivity, SmoothGrad

    from inference.explain import LogitsOnly

    logits = LogitsOnly(model).eval()

    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    if method.kind in ("gradcam", "gradcampp", "guidedgradcam"):
        cls = GradCAMpp if method.kind == "gradcampp" else GradCAM
        cam = cls(nn_module=logits, target_layers=f"model.{method.layer}", postprocessing=identity)

        def grad_cam(x: torch.Tensor, c: int) -> np.ndarray:
            with torch.enable_grad():
                out = cam(x=x, class_idx=c)
            return (
                torch.nan_to_num(out[0, 0].detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0).cpu().numpy()
            )

        if method.kind != "guidedgradcam":
            return grad_cam
        guided = make_explainer(Method("guided backprop", "guided"), model)

        def guided_grad_cam(x: torch.Tensor, c: int) -> np.ndarray:
            # Selvaraju et al.: the fine-grained guided-backprop saliency, kept where the class's Grad-CAM is hot
            return guided(x, c) * grad_cam(x, c)

        return guided_grad_cam
    if method.kind == "occlusion":
        occlusion = OcclusionSensitivity(
            nn_module=logits,
            mask_size=method.settings["mask_size"],
            n_batch=8,
            verbose=False,
            overlap=method.settings["overlap"],
            mode="gaussian",
            activate=True,
        )

        def occ(x: torch.Tensor, c: int) -> np.ndarray:
            with torch.no_grad():
                p0 = torch.softmax(logits(x), dim=1)[0, c]
                occ_map, _ = occlusion(x)
            drop = p0 - occ_map[0, c]  # (B, classes, X, Y, Z): how much hiding each region lowers the probability
            return drop.clamp(min=0).float().cpu().numpy()

        return occ
    if method.kind in ("smoothgrad", "guided"):
        grad = (
            SmoothGrad(logits, verbose=False, **method.settings)
            if method.kind == "smoothgrad"
            else GuidedBackpropGrad(logits)
        )

        def saliency(x: torch.Tensor, c: int) -> np.ndarray:
            with torch.enable_grad():
                g = grad(x.clone().detach(), index=c)
            return g[0].abs().sum(0).float().cpu().numpy()

        return saliency
    if method.kind == "random":
        rng = np.random.default_rng(0)
        return lambda x, c: rng.random(tuple(x.shape[2:])).astype(np.float32)
    raise ValueError(f"unknown explanation method kind {method.kind!r}")


# --- plan and run --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplainPlan:
    """Size of the benchmark."""

    patients: int
    small: bool
    epochs: int
    run_config: Mapping[str, Any]
    smoothgrad_samples: int
    occlusion_overlap: float
    max_studies: int
    occlusion_divisor: int = 6

    def __post_init__(self) -> None:
        if self.patients < 6 or self.epochs < 1 or self.max_studies < 1:
            raise ValueError(
                f"need >= 6 patients, >= 1 epoch and >= 1 study, got {self.patients}, {self.epochs}, {self.max_studies}"
            )


def plan_for(options: BenchOptions) -> ExplainPlan:
    """Tiny (test suite, seconds: figures mean little), quick (a few minutes on 2 cores) or full (the demo's model
    size: DenseNet121 on 64x64x48 at 5 mm)."""
    if options.tiny:
        return ExplainPlan(
            patients=12,
            small=True,
            epochs=1,
            smoothgrad_samples=2,
            occlusion_overlap=0.0,
            max_studies=2,
            occlusion_divisor=2,
            run_config={
                "model-name": "densenet121",
                "input-size": "32,32,32",
                "target-spacing-mm": "12.0,12.0,10.0",
                "batch-size": 4,
                "learning-rate": 0.001,
            },
        )
    if options.quick:
        return ExplainPlan(
            patients=40,
            small=False,
            epochs=8,
            smoothgrad_samples=8,
            occlusion_overlap=0.0,
            max_studies=10,
            occlusion_divisor=4,
            run_config={
                "model-name": "densenet121",
                "input-size": "48,48,40",
                "target-spacing-mm": "8.0,8.0,8.0",
                "batch-size": 4,
                "learning-rate": 0.001,
            },
        )
    return ExplainPlan(
        patients=100,
        small=False,
        epochs=12,
        smoothgrad_samples=25,
        occlusion_overlap=0.25,
        max_studies=40,
        run_config={"model-name": "densenet121", "batch-size": 4, "learning-rate": 0.001},
    )


def train(site: Any, settings: Any, *, epochs: int) -> Any:
    """fedct's local training (``fl_client.train.train_model``) on the site's training split, then BatchNorm
    statistics of the final weights (``recalibrate_batch_norm``), as a site does before sending them."""
    import torch
    from monai.utils import set_determinism

    from fl_client.train import load_site, recalibrate_batch_norm, train_model
    from models.factory import build_model
    from preprocessing.cache import make_dataset

    set_determinism(seed=settings.seed)
    torch.manual_seed(settings.seed)
    manifest = load_site(site, settings)
    items = [e.item() for e in manifest.split("train", labelled_only=False)]
    from monai.data import DataLoader

    def loader(augment: bool) -> DataLoader:
        dataset = make_dataset(items, settings.pipeline, manifest.site_dir, augment=augment)
        return DataLoader(
            dataset,
            batch_size=settings.batch_size,
            shuffle=augment,
            num_workers=0,
            generator=torch.Generator().manual_seed(settings.seed),
        )

    model = build_model(settings.model)
    device = torch.device("cpu")
    result = train_model(
        model, loader(True), epochs=epochs, lr=settings.learning_rate, device=device, loss_weights=settings.loss_weights
    )
    recalibrate_batch_norm(model, loader(False), device=device)
    return model.eval(), manifest, result


def held_out_positives(manifest: Any, mask_dir: Path, class_names: Sequence[str]) -> tuple[list[Any], dict[str, int]]:
    """Validation and test studies with a lesion diagnosis and a mask file; counts of what was left out and why."""
    from preprocessing.volume import as_series

    chosen, skipped = [], {"normal": 0, "no_mask_file": 0}
    for entry in [*manifest.split("val"), *manifest.split("test")]:
        if class_names[entry.diagnosis] == "normal":
            skipped["normal"] += 1
            continue
        series = as_series(entry.series)
        if not (mask_dir / f"{series.StudyInstanceUID}.nii.gz").is_file():
            skipped["no_mask_file"] += 1
            continue
        chosen.append(entry)
    return chosen, skipped


def evaluate(
    model: Any,
    studies: Sequence[tuple[np.ndarray, np.ndarray, int]],
    methods: Sequence[Method],
    *,
    spacing_mm: Sequence[float],
) -> dict[str, Any]:
    """Every method on every (image, mask, class) study: per-study figures and their summaries."""
    import torch

    def probability(c: int) -> Callable[[np.ndarray], np.ndarray]:
        def run(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.softmax(model(torch.from_numpy(batch)).logits, dim=1)[:, c].numpy()

        return run

    out: dict[str, Any] = {}
    for method in methods:
        explain = make_explainer(method, model)
        rows = []
        for image, mask, c in studies:
            x = torch.from_numpy(image[None])
            t0 = time.perf_counter()
            heat = explain(x, c)
            seconds = time.perf_counter() - t0
            _, curve, auc = deletion_curve(probability(c), image, heat)
            rows.append(
                {
                    "pointing": pointing_hit(heat, mask),
                    "pointing_10mm": pointing_hit(
                        heat, mask, spacing_mm=spacing_mm, tolerance_mm=POINTING_TOLERANCE_MM
                    ),
                    "energy_ratio": energy_ratio(heat, mask),
                    "lesion_share": float(mask.mean()),
                    "deletion_auc": auc,
                    "deletion_curve": [round(float(v), 4) for v in curve],
                    "seconds": seconds,
                    "empty_map": not float(heat.max()) > 0,
                }
            )
        out[method.name] = {
            "kind": method.kind,
            "layer": method.layer,
            "settings": dict(method.settings),
            "pointing_hit_rate": float(np.mean([r["pointing"] for r in rows])) if rows else None,
            "pointing_10mm_hit_rate": float(np.mean([r["pointing_10mm"] for r in rows])) if rows else None,
            "energy_ratio": summarise(r["energy_ratio"] for r in rows),
            "deletion_auc": summarise(r["deletion_auc"] for r in rows),
            "seconds_per_study": summarise(r["seconds"] for r in rows),
            "empty_maps": sum(r["empty_map"] for r in rows),
            "per_study": rows,
        }
    return out


def choose(results: Mapping[str, Any]) -> dict[str, Any]:
    """The recommended method: best pointing game, then median energy ratio, then deletion AUC, among methods not
    slower than :data:`MAX_SECONDS_FACTOR` x the fastest Grad-CAM (a heat map is made for every prediction)."""
    cams = [
        r["seconds_per_study"]["median"]
        for r in results.values()
        if r["kind"] in ("gradcam", "gradcampp") and r["seconds_per_study"]["median"] is not None
    ]
    budget = MAX_SECONDS_FACTOR * min(cams) if cams else float("inf")

    def key(item: tuple[str, Any]) -> tuple[float, float, float]:
        r = item[1]
        return (
            r["pointing_hit_rate"] or 0.0,
            r["energy_ratio"]["median"] or 0.0,
            -(r["deletion_auc"]["median"] or 1.0),
        )

    eligible = {
        n: r
        for n, r in results.items()
        if r["kind"] != "random" and (r["seconds_per_study"]["median"] or 0.0) <= budget
    }
    if not eligible:
        return {"method": None, "reason": "no method within the time budget"}
    name, best = max(eligible.items(), key=key)
    return {
        "method": name,
        "kind": best["kind"],
        "layer": best["layer"],
        "rule": f"highest pointing-game hit rate, then median energy ratio, then lowest deletion AUC, among methods at "
        f"most {MAX_SECONDS_FACTOR:g}x the fastest Grad-CAM's time per study",
        "meets_pointing_goal": (best["pointing_hit_rate"] or 0.0) >= GOAL_POINTING,
        "meets_energy_goal": (best["energy_ratio"]["median"] or 0.0) >= GOAL_ENERGY_RATIO,
    }


def run(options: BenchOptions) -> Path:
    """Train at one synthetic site, score every method on its held-out positive studies; write ``explain.json``."""
    import torch

    from bench.train_loop import bench_settings
    from fl_client.config import SiteConfig
    from preprocessing.volume import as_series

    started = time.perf_counter()
    plan = plan_for(options)
    work = Path(options.out) / "explain-work"
    data_root = synthetic_sites(work / "data", sites=1, patients_per_site=plan.patients, seed=0, small=plan.small)
    name = site_names(data_root)[0]
    mask_dir = data_root / name / MASK_FOLDER
    if not mask_dir.is_dir():
        raise RuntimeError(
            f"no lesion masks in {mask_dir}: this synthetic generator does not write them "
            "(synthetic.hospitals must write <site>/lesion-masks/<StudyInstanceUID>.nii.gz)"
        )
    settings = bench_settings(plan.run_config)
    site = SiteConfig(
        site_name=name,
        dicom_dir=data_root / name / "dicom",
        site_dir=work / "sites" / name,
        labels_csv=data_root / name / "labels.csv",
        device="cpu",
    )
    t0 = time.perf_counter()
    model, manifest, trained = train(site, settings, epochs=plan.epochs)
    train_seconds = time.perf_counter() - t0
    class_names = tuple(manifest.class_names)
    entries, skipped = held_out_positives(manifest, mask_dir, class_names)
    studies, empty_masks, correct = [], 0, 0
    for entry in entries[: plan.max_studies]:
        series = as_series(entry.series)
        image, mask = image_and_mask_on_model_grid(
            series, mask_dir / f"{series.StudyInstanceUID}.nii.gz", settings.pipeline
        )
        if not mask.any():
            empty_masks += 1  # the lesion lies outside the model's crop
            continue
        with torch.no_grad():
            correct += int(int(model(torch.from_numpy(image[None])).logits.argmax(1)) == entry.diagnosis)
        studies.append((image, mask, int(entry.diagnosis)))
    if not studies:
        raise RuntimeError(
            f"no held-out positive study with a lesion on the model grid (skipped: {skipped}, "
            f"empty on the grid: {empty_masks})"
        )
    methods = methods_for(
        settings.model.name,
        settings.pipeline.input_size,
        samples=plan.smoothgrad_samples,
        occlusion_overlap=plan.occlusion_overlap,
        occlusion_divisor=plan.occlusion_divisor,
    )
    results = evaluate(model, studies, methods, spacing_mm=settings.pipeline.target_spacing_mm)
    payload = {
        "plan": {
            "patients": plan.patients,
            "epochs": plan.epochs,
            "small_images": plan.small,
            **dict(plan.run_config),
            "smoothgrad_samples": plan.smoothgrad_samples,
            "occlusion_overlap": plan.occlusion_overlap,
            "occlusion_patch": f"input size / {plan.occlusion_divisor} per axis",
        },
        "device": "cpu",
        "gpu_seconds": None,  # not measured: run the benchmark on a GPU machine to fill in the GPU cost
        "training": {"seconds": train_seconds, "loss": trained.loss, "steps": trained.steps},
        "studies": {
            "scored": len(studies),
            "correct_diagnosis": correct,
            "skipped": skipped,
            "mask_empty_on_model_grid": empty_masks,
        },
        "goals": {"pointing_hit_rate": GOAL_POINTING, "energy_ratio": GOAL_ENERGY_RATIO},
        "deletion": {
            "max_fraction": DELETION_MAX_FRACTION,
            "steps": DELETION_STEPS,
            "baseline": "air (0 after windowing)",
        },
        "methods": results,
        "recommended": choose(results),
    }
    return write_result(Path(options.out), "explain", payload, options=options, started=started)
