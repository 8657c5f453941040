"""Grad-CAM(++) heat maps of the diagnosis head, mapped back to the original CT grid, and key-slice overlays.

1. :class:`GradCamExplainer` runs MONAI's ``GradCAM`` (``GradCAMpp``, Grad-CAM++, on request; plain Grad-CAM is its
   fallback when Grad-CAM++'s exp(logit) overflows) on a logits-only view of the multi-task network for the predicted
   class. Grad-CAM is the default by the numbers of ``fedct bench explain``: on every trained model measured (DenseNet121
   at the quick size, two small CNNs at 300 patients per site) it put more of its energy inside the planted lesions than
   Grad-CAM++ at the same layer (2.6 vs 1.6; 4.0 vs 2.6; 4.4 vs 2.7 times their volume share) with a pointing-game hit
   rate as high or higher (README, "Explanations").
   The target layer is, per backbone, the deepest candidate whose map still has at least :data:`MIN_CELLS` cells
   along every axis (at the default 64x64x48 input: DenseNet121's second transition, 8x8x6; its third, 4x4x3, spread
   the map over the whole thorax).
2. :func:`cam_to_original_grid` maps the map from the model grid (after orientation, resampling, crop and pad)
   back onto the HU volume as :func:`preprocessing.volume.read_hu_volume` lays it out: MONAI's own inverse of the
   crop/pad steps (regions the model never saw become 0), then one trilinear resampling through the affines,
   which is exactly the inverse of orientation + spacing, computed slab by slab so that a 512x512x600 CT needs
   little memory. ``method="inverse"`` runs MONAI's full ``Compose.inverse`` instead (same result, several GB for
   a full-size CT); if the inverse cannot be applied the map is resampled from the model grid by affines alone.
3. :func:`select_key_slices` picks the slices where the map is strongest; :func:`render_overlay` draws one in a
   lung window with the heat map, a colour bar, orientation letters (radiological convention for axial slices:
   the patient's right on the image's left) and the slice position.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose, Cropd, InvertibleTransform, Padd
from monai.visualize import GradCAM, GradCAMpp
from torch import nn

from models.factory import MultiTaskNet
from preprocessing.validate import ValidatedSeries, slice_normal

__all__ = [
    "CANDIDATE_LAYERS",
    "DEFAULT_VARIANT",
    "Explanation",
    "GradCamExplainer",
    "HeatPeak",
    "LogitsOnly",
    "cam_to_original_grid",
    "explain_study",
    "heat_peaks",
    "render_overlay",
    "resample_to_grid",
    "select_key_slices",
]

#: Grad-CAM target layers per backbone, deepest first (names as in ``MultiTaskNet.named_modules()``).
CANDIDATE_LAYERS: dict[str, tuple[str, ...]] = {
    "smallcnn": ("backbone.features.14", "backbone.features.10", "backbone.features.6"),  # ReLU of blocks 4, 3, 2
    "densenet121": (
        "backbone.class_layers.relu",  # norm5 + ReLU of the last dense block
        "backbone.features.transition3.relu",  # dense block 3, normalised
        "backbone.features.transition2.relu",
        "backbone.features.transition1.relu",
    ),
    "resnet10": ("backbone.layer4", "backbone.layer3", "backbone.layer2"),
    "resnet18": ("backbone.layer4", "backbone.layer3", "backbone.layer2"),
}
#: A target layer's map must have at least this many cells along every spatial axis. Measured by ``fedct bench
#: explain`` (README, "Explanations"): maps of 2-4 cells per axis pointed at a lesion in 0-7 % of positive studies
#: with 1.0-1.5 x the lesions' share of the energy (DenseNet121 3x3x2; small CNN 4x4x4, two models), the next finer
#: layer (6x6x5; 8x8x8) in 20-23 % with 2.6-4.4 x; finer still (12x12x10; 16^3) rarely hit a lesion (0-3 %).
MIN_CELLS = 5
#: Heat-map methods (MONAI classes) by name.
VARIANTS = {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMpp}
#: The method of :class:`GradCamExplainer` unless asked otherwise (chosen by ``fedct bench explain``, see the module doc).
DEFAULT_VARIANT = "Grad-CAM"
#: Lung window (width, level) in HU.
LUNG_WINDOW = (1500.0, -600.0)
#: Heat below this fraction of the study's maximum is not drawn.
HEAT_THRESHOLD = 0.3


class LogitsOnly(nn.Module):
    """The diagnosis logits of a :class:`MultiTaskNet` (what Grad-CAM differentiates); layers under ``model.``.

    One view of the input (:meth:`MultiTaskNet.forward_view`), also for a model with test-time flips: a map is the
    gradient of one pass, whose activations the explainers' hooks keep."""

    def __init__(self, model: MultiTaskNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, covariates: torch.Tensor | None = None, profile: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.forward_view(x, covariates, profile).logits


def _map_sizes(
    model: MultiTaskNet, names: Sequence[str], input_size: Sequence[int], device: torch.device
) -> dict[str, tuple[int, ...]]:
    """Spatial size of each named layer's output for one input of ``input_size`` (a dry run, no gradients)."""
    sizes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"Grad-CAM target layer(s) not in the network: {', '.join(missing)}")
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[2:])))
        for n in names
    ]
    try:
        x = torch.zeros((1, _in_channels(model), *input_size), device=device)
        covariates = torch.zeros((1, model.n_covariates), device=device) if model.n_covariates else None
        profile = torch.zeros((1, model.n_profile), device=device) if getattr(model, "n_profile", 0) else None
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(x, covariates, profile)
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            return module.in_channels
    return 1


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class GradCamExplainer:
    """Grad-CAM(++) of the diagnosis head of one model (a private copy: hooks never touch the caller's network)."""

    def __init__(
        self,
        model: MultiTaskNet,
        *,
        model_name: str,
        input_size: Sequence[int],
        target_layer: str | None = None,
        variant: str = DEFAULT_VARIANT,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"heat-map variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if target_layer is None and model_name not in CANDIDATE_LAYERS:
            raise ValueError(f"no Grad-CAM target layer known for model {model_name!r}; pass target_layer")
        self.model = copy.deepcopy(model).eval()
        self.device = next(self.model.parameters()).device
        candidates = (target_layer,) if target_layer else CANDIDATE_LAYERS[model_name]
        sizes = _map_sizes(self.model, candidates, input_size, self.device)
        usable = [n for n in candidates if min(sizes.get(n, (0,))) >= MIN_CELLS]
        self.target_layer: str = usable[0] if usable else candidates[-1]
        self.map_size: tuple[int, ...] = sizes.get(self.target_layer, ())
        self.variant = variant
        # Identity post-processing: MONAI's default normaliser maps the maximum to 0; we normalise per study later.
        self._cam = VARIANTS[variant](
            nn_module=LogitsOnly(self.model), target_layers=f"model.{self.target_layer}", postprocessing=_identity
        )
        # Plain Grad-CAM on the same hooks, for when Grad-CAM++ overflows (it weighs gradients by exp(logit)).
        self._fallback = GradCAM(
            nn_module=self._cam.nn_module, target_layers=f"model.{self.target_layer}", postprocessing=_identity
        )
        self.last_variant = variant

    def __call__(
        self,
        image: torch.Tensor,
        *,
        class_index: int,
        covariates: torch.Tensor | None = None,
        profile: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Non-negative heat map (X, Y, Z) on the model-input grid, on the CPU (unnormalised); ``covariates`` and
        ``profile`` as the model fuses them (the study's own, so the map explains the reported prediction)."""
        image = image.to(self.device)
        kwargs = {} if covariates is None else {"covariates": covariates.to(self.device)}
        if profile is not None:
            kwargs["profile"] = profile.to(self.device)
        with torch.enable_grad():
            cam = self._cam(x=image, class_idx=int(class_index), **kwargs)
            self.last_variant = self.variant
            if not bool(torch.isfinite(cam).all()) and self._fallback is not self._cam:
                cam = self._fallback(x=image, class_idx=int(class_index), **kwargs)
                self.last_variant = "Grad-CAM"
        return torch.nan_to_num(cam[0, 0].detach().float(), nan=0.0, posinf=0.0, neginf=0.0).cpu()


# --- back to the original grid -------------------------------------------------------------------------------------


def resample_to_grid(
    source: torch.Tensor,
    source_affine: np.ndarray,
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    chunk_voxels: int = 1 << 21,
) -> np.ndarray:
    """Trilinear resampling of ``source`` (X, Y, Z; voxel->world ``source_affine``) onto the grid ``shape`` with
    voxel->world ``affine``; 0 outside the source. Computed slab by slab along the last axis."""
    src = torch.as_tensor(source, dtype=torch.float32).cpu()
    if src.ndim != 3:
        raise ValueError(f"source must be 3-D, got shape {tuple(src.shape)}")
    m = np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    m_lin = torch.as_tensor(m[:3, :3].T, dtype=torch.float64)
    m_off = torch.as_tensor(m[:3, 3], dtype=torch.float64)
    sizes = torch.as_tensor(src.shape, dtype=torch.float64)
    nx, ny, nz = (int(n) for n in shape)
    out = np.zeros((nx, ny, nz), dtype=np.float32)
    volume = src[None, None]
    step = max(1, chunk_voxels // max(1, nx * ny))
    ii, jj = torch.arange(nx, dtype=torch.float64), torch.arange(ny, dtype=torch.float64)
    for k0 in range(0, nz, step):
        kk = torch.arange(k0, min(nz, k0 + step), dtype=torch.float64)
        index = torch.stack(torch.meshgrid(ii, jj, kk, indexing="ij"), dim=-1)  # (X, Y, k, 3)
        at = index @ m_lin + m_off  # source voxel coordinates
        norm = torch.where(sizes > 1, 2.0 * at / (sizes - 1).clamp(min=1) - 1.0, torch.where(at.abs() < 0.5, 0.0, 2.0))
        grid = norm[..., [2, 1, 0]].to(torch.float32)[None]  # grid_sample wants (W, H, D) = (Z, Y, X) order
        sampled = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out[:, :, k0 : k0 + kk.numel()] = sampled[0, 0].numpy()
    return out


def _as_meta(cam: torch.Tensor, grid: MetaTensor) -> MetaTensor:
    """The map as a MetaTensor carrying a private copy of the image's metadata and applied operations."""
    if tuple(cam.shape) != tuple(grid.shape[1:]):
        raise ValueError(f"heat map shape {tuple(cam.shape)} differs from the model input grid {tuple(grid.shape[1:])}")
    out = MetaTensor(torch.as_tensor(cam, dtype=torch.float32).cpu()[None], meta=copy.deepcopy(dict(grid.meta)))
    out.applied_operations = copy.deepcopy(list(grid.applied_operations))
    return out


def cam_to_original_grid(
    cam: torch.Tensor,
    grid: MetaTensor,
    transforms: Sequence[Any],
    *,
    shape: Sequence[int],
    affine: np.ndarray,
    method: str = "auto",
) -> tuple[np.ndarray, str]:
    """Map a model-grid map onto the original CT grid; return ``(map, method used)``.

    ``grid`` is the model input as a MetaTensor with its applied operations, ``transforms`` the transform
    instances that produced it. ``method``: ``auto`` (crop/pad inverted by MONAI, the rest by the affines; falls
    back to ``affine`` on failure), ``inverse`` (MONAI ``Compose.inverse`` of everything) or ``affine``.
    """
    shape = tuple(int(n) for n in shape)
    if method not in ("auto", "inverse", "affine"):
        raise ValueError(f"method must be auto, inverse or affine, got {method!r}")
    if method == "inverse":
        inverted = Compose(list(transforms)).inverse({"image": _as_meta(cam, grid)})["image"]
        result = inverted.as_tensor()[0].float().cpu().numpy()
        if result.shape != shape:
            raise ValueError(f"inverse produced shape {result.shape}, the CT has {shape}")
        return result, "inverse"
    if method == "auto":
        try:
            data = {"image": _as_meta(cam, grid)}
            for transform in reversed(list(transforms)):
                if not isinstance(transform, InvertibleTransform):
                    continue  # intensity steps leave the geometry alone
                if not isinstance(transform, (Cropd, Padd)):
                    break  # orientation / resampling: inverted below through the affines
                data = transform.inverse(data)
            source = data["image"]
            return resample_to_grid(source.as_tensor()[0], source.affine.numpy(), shape, affine), "inverse-crop+affine"
        except Exception:  # noqa: BLE001 - an unexpected pipeline: the affines alone still place the map
            pass
    return resample_to_grid(torch.as_tensor(cam), grid.affine.numpy(), shape, affine), "affine"


# --- key slices and overlays ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatPeak:
    """A local maximum of a heat map: voxel indices (X, Y, slice) and its value."""

    voxel: tuple[int, int, int]
    value: float


def _local_maxima(heat: np.ndarray, *, chunk_slices: int = 64) -> np.ndarray:
    """Boolean array: voxels equal to the maximum of their 3x3x3 neighbourhood (slab by slab: little memory)."""
    out = np.zeros(heat.shape, dtype=bool)
    nz = heat.shape[2]
    for k0 in range(0, nz, chunk_slices):
        lo, hi = max(0, k0 - 1), min(nz, k0 + chunk_slices + 1)
        slab = torch.from_numpy(np.ascontiguousarray(heat[:, :, lo:hi], dtype=np.float32))[None, None]
        pooled = F.max_pool3d(slab, kernel_size=3, stride=1, padding=1)[0, 0].numpy()
        keep = slice(k0 - lo, k0 - lo + min(chunk_slices, nz - k0))
        out[:, :, k0 : k0 + chunk_slices] = (heat[:, :, lo:hi] >= pooled)[:, :, keep]
    return out


def heat_peaks(
    heat: np.ndarray, *, count: int = 3, min_gap: int = 2, min_relative: float = HEAT_THRESHOLD
) -> tuple[HeatPeak, ...]:
    """Up to ``count`` separated maxima of ``heat`` (X, Y, slices), strongest first.

    A peak is a voxel at the maximum of its 3x3x3 neighbourhood, at least ``min_relative`` of the map's maximum
    (weaker heat is not drawn on the overlays), on a slice at least ``min_gap`` slices from every stronger peak's
    slice: each peak is a separate hot region, not the shoulder of the strongest one. Empty for a map without
    positive values. Raises ValueError for a map that is not 3-D or has NaN/infinite values.
    """
    heat = np.asarray(heat)
    if heat.ndim != 3 or 0 in heat.shape:
        raise ValueError(f"heat map must be 3-D (X, Y, slices) and not empty, got shape {heat.shape}")
    if count < 1 or min_gap < 1:
        raise ValueError(f"count and min_gap must be >= 1, got count={count}, min_gap={min_gap}")
    finite = np.isfinite(heat)
    if not finite.all():
        bad = int(heat.size - finite.sum())
        raise ValueError(
            f"heat map has {bad} non-finite value(s) (NaN or infinity) of {heat.size}: the explainer "
            "failed for this study; no key slices can be chosen from it"
        )
    top = float(heat.max())
    if not top > 0:
        return ()
    peaks = _local_maxima(heat) & (heat >= min_relative * top)
    # The strongest peak of each slice, then greedily the strongest slices at least min_gap apart.
    masked = np.where(peaks, heat, -np.inf)
    flat = masked.reshape(-1, heat.shape[2])
    best_in_slice = flat.max(axis=0)
    chosen: list[HeatPeak] = []
    for k in np.argsort(-best_in_slice, kind="stable"):
        if not np.isfinite(best_in_slice[k]) or len(chosen) == count:
            break
        if all(abs(int(k) - p.voxel[2]) >= min_gap for p in chosen):
            i, j = np.unravel_index(int(np.argmax(flat[:, k])), heat.shape[:2])
            chosen.append(HeatPeak((int(i), int(j), int(k)), float(best_in_slice[k])))
    return tuple(chosen)


def select_key_slices(
    heat: np.ndarray, *, count: int = 3, min_gap: int = 2, min_relative: float = HEAT_THRESHOLD
) -> tuple[int, ...]:
    """Slices (last axis) through up to ``count`` separated maxima of the map (:func:`heat_peaks`), strongest
    first: where the model looked, not fixed positions. The middle slice when the map has no positive value
    (the overlay then says there is no heat-map signal). Raises ValueError for NaN/infinite values."""
    peaks = heat_peaks(heat, count=count, min_gap=min_gap, min_relative=min_relative)
    return tuple(p.voxel[2] for p in peaks) if peaks else (np.asarray(heat).shape[2] // 2,)


def _letter(direction: np.ndarray) -> str:
    """Patient direction letter of a RAS vector (its dominant axis)."""
    axis = int(np.argmax(np.abs(direction)))
    return ("RL", "AP", "SI")[axis][0 if direction[axis] > 0 else 1]


def display_slice(
    volume: np.ndarray, affine: np.ndarray, k: int
) -> tuple[np.ndarray, dict[str, str], tuple[float, float], str]:
    """Slice ``k`` of a (Columns, Rows, slices) volume as an image (rows, columns) for display.

    Axial slices are turned to radiological convention (patient's right on the image's left, anterior up). Returns
    ``(image, {"left","right","top","bottom"} letters, (row spacing, column spacing) mm, "transform")``; apply the
    same transform to a heat map with :func:`_apply_display`.
    """
    right = affine[:3, 0] / np.linalg.norm(affine[:3, 0])  # +column on screen = array axis 0
    down = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    spacing = (float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0])))
    ops = ["T"]
    normal = affine[:3, 2]
    if int(np.argmax(np.abs(normal))) == 2:  # axial: radiological convention
        if int(np.argmax(np.abs(right))) == 1:  # rows run left-right: transpose back
            ops.append("T")
            right, down = down, right
            spacing = spacing[::-1]
        if right[0] > 0:  # screen-right points to the patient's right: mirror
            ops.append("LR")
            right = -right
        if down[1] > 0:  # screen-down points anterior: flip
            ops.append("UD")
            down = -down
    labels = {"right": _letter(right), "left": _letter(-right), "bottom": _letter(down), "top": _letter(-down)}
    transform = ",".join(ops)
    return _apply_display(volume[:, :, k], transform), labels, spacing, transform


def _apply_display(plane: np.ndarray, transform: str) -> np.ndarray:
    out = plane
    for op in transform.split(","):
        out = out.T if op == "T" else out[:, ::-1] if op == "LR" else out[::-1, :] if op == "UD" else out
    return np.ascontiguousarray(out)


def render_overlay(
    hu: np.ndarray,
    heat: np.ndarray,
    affine: np.ndarray,
    k: int,
    path: Path,
    *,
    title: str,
    heat_label: str | None = None,
    window: tuple[float, float] = LUNG_WINDOW,
    threshold: float = HEAT_THRESHOLD,
) -> Path:
    """Draw slice ``k`` of ``hu`` in ``window`` (width, level) with ``heat`` (0..1, same grid) and write a PNG.

    The colour bar says what the colours mean (``heat_label``, by default :func:`inference.wording.heat_map_colour_label`).
    """
    from inference.wording import heat_map_colour_label

    heat_label = heat_map_colour_label() if heat_label is None else heat_label
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ct, labels, (row_mm, col_mm), transform = display_slice(hu, affine, k)
    h = _apply_display(heat[:, :, k], transform)
    width, level = window
    extent = (0.0, ct.shape[1] * col_mm, ct.shape[0] * row_mm, 0.0)
    fig = Figure(figsize=(6.4, 5.7), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.78, 0.88))
    ax.set_facecolor("black")
    ax.imshow(ct, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, extent=extent, interpolation="bilinear")
    shown = ax.imshow(
        np.ma.masked_less(h, threshold),
        cmap="jet",
        vmin=0.0,
        vmax=1.0,
        alpha=0.45,
        extent=extent,
        interpolation="bilinear",
    )
    ax.set_axis_off()
    ax.set_title(title, color="white", fontsize=9)
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    for where, (x, y, ha, va) in {
        "left": (0.015, 0.5, "left", "center"),
        "right": (0.985, 0.5, "right", "center"),
        "top": (0.5, 0.985, "center", "top"),
        "bottom": (0.5, 0.015, "center", "bottom"),
    }.items():
        ax.text(
            x,
            y,
            labels[where],
            transform=ax.transAxes,
            ha=ha,
            va=va,
            color="yellow",
            fontsize=13,
            fontweight="bold",
            path_effects=outline,
        )
    ax.text(
        0.015,
        0.015,
        f"W {width:g} / L {level:g}",
        transform=ax.transAxes,
        ha="left",
        va="bottom",
        color="white",
        fontsize=7,
        path_effects=outline,
    )
    cax = fig.add_axes((0.83, 0.1, 0.035, 0.72))
    bar = fig.colorbar(shown, cax=cax)
    bar.solids.set_alpha(1.0)
    bar.set_label(heat_label, color="white", fontsize=7)
    bar.ax.tick_params(colors="white", labelsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor="black")
    return path


# --- one study -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Explanation:
    """Key slices and overlays of one study, and how the heat map was made (``heat``: on the original grid, 0..1)."""

    overlays: tuple[Path, ...]
    key_slices: tuple[int, ...]
    positions_mm: tuple[float, ...]
    info: dict[str, Any]
    heat: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros((0, 0, 0), np.float32))


def slice_position_mm(series: ValidatedSeries, k: int) -> float:
    """Position of sorted slice ``k``: patient z (mm) for an axial series, else the distance along the normal."""
    normal = slice_normal(series.ImageOrientationPatient)
    if int(np.argmax(np.abs(normal))) == 2:
        return float(series.first_position[2] + k * series.slice_step_mm * normal[2])
    return float(np.dot(series.first_position, normal) + k * series.slice_step_mm)


def explain_study(
    explainer: GradCamExplainer,
    prepared: Any,
    *,
    class_index: int,
    series: ValidatedSeries,
    out_dir: Path,
    class_label: str,
    covariates: torch.Tensor | None = None,
    profile: torch.Tensor | None = None,
    count: int = 3,
    min_gap_mm: float = 10.0,
    method: str = "auto",
) -> Explanation:
    """Grad-CAM for ``class_index`` on a prepared study (:class:`inference.predict.ModelInput`), mapped to the CT,
    with up to ``count`` key-slice overlays ``overlay-sliceNNNN.png`` written into ``out_dir`` (older ones removed)."""
    from inference.wording import class_phrase, heat_map_legend

    cam = explainer(prepared.image, class_index=class_index, covariates=covariates, profile=profile)
    heat, used = cam_to_original_grid(
        cam, prepared.grid, prepared.transforms, shape=prepared.hu.shape, affine=prepared.affine, method=method
    )
    peak = float(heat.max()) if heat.size else 0.0
    heat = np.clip(heat / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heat)
    min_gap = max(2, math.ceil(min_gap_mm / series.slice_step_mm))
    peaks = heat_peaks(heat, count=count, min_gap=min_gap)
    slices = tuple(p.voxel[2] for p in peaks) if peaks else (heat.shape[2] // 2,)
    positions = tuple(slice_position_mm(series, k) for k in slices)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("overlay-slice*.png"):
        stale.unlink()
    axial = int(np.argmax(np.abs(slice_normal(series.ImageOrientationPatient)))) == 2
    overlays = []
    for rank, (k, z) in enumerate(zip(slices, positions), start=1):
        where = f"z = {z:.1f} mm" if axial else f"{z:.1f} mm along the slice normal"
        title = (
            f"Key slice {rank}: {k + 1}/{heat.shape[2]}, {where}\n"
            f"{explainer.last_variant} heat map for {class_phrase(class_label)}"
        )
        if peak <= 0:
            title = f"Slice {k + 1}/{heat.shape[2]}, {where}\n(no heat-map signal for this prediction)"
        overlays.append(
            render_overlay(prepared.hu, heat, prepared.affine, k, out_dir / f"overlay-slice{k:04d}.png", title=title)
        )
    peak_voxel = tuple(int(i) for i in np.unravel_index(int(np.argmax(heat)), heat.shape)) if peak > 0 else None
    info = {
        "method": explainer.last_variant,
        "target_layer": explainer.target_layer,
        "map_cells": list(explainer.map_size),
        "class": class_label,
        "mapping": used,
        "peak_voxel": peak_voxel,
        "empty": peak <= 0,
        "key_slice_rule": "separated maxima",
        "key_slice_peaks": [{"voxel": list(p.voxel), "relative_heat": round(p.value, 4)} for p in peaks],
        "legend": heat_map_legend(explainer.last_variant, class_label, threshold=HEAT_THRESHOLD),
    }
    return Explanation(tuple(overlays), slices, positions, info, heat)
