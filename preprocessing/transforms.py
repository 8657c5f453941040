"""Stage 4: HU volume -> model input, as MONAI transforms.

Deterministic transforms come first so that their output can be cached on disk (``cache.py``); random
augmentation runs after the cache, on every epoch. The same :class:`PipelineConfig` is recorded in every
model's provenance so that inference repeats exactly what training saw.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    InvertibleTransform,
    MapTransform,
    RandAffined,
    RandFlipd,
    RandGaussianNoise,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
)
from monai.utils import MetaKeys, SpaceKeys, TraceKeys

from preprocessing.pipeline import PIPELINE_VERSION, AugmentConfig, PipelineConfig  # noqa: F401 - the settings live there (no torch)
from preprocessing.validate import as_series
from preprocessing.volume import read_hu_volume, read_resampled_volume, series_affine


class LoadCTSeriesd(MapTransform):
    """MONAI dictionary transform: replace ``data[key]`` (a :class:`ValidatedSeries` as a dict) by its HU volume.

    The output is a channel-first :class:`monai.data.MetaTensor` carrying the RAS affine, ready for
    ``Orientationd``/``Spacingd``.
    """

    def __init__(self, keys: str | list[str], *, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            series = as_series(d[key])
            volume, affine = read_hu_volume(series)
            d[key] = MetaTensor(
                torch.from_numpy(volume[None]),
                affine=torch.as_tensor(affine, dtype=torch.float64),
                meta={MetaKeys.SPACE: SpaceKeys.RAS},
            )
        return d


class LoadResampledCTd(MapTransform, InvertibleTransform):
    """MONAI dictionary transform: ``data[key]`` (a :class:`ValidatedSeries`, or its dict) -> HU on the model grid.

    Does in one pass over the files what ``LoadCTSeriesd`` + ``Orientationd("RAS")`` + ``Spacingd(pixdim)`` do
    (see :func:`read_resampled_volume`): a channel-first :class:`monai.data.MetaTensor` with MONAI's grid affine.
    With ``hu_key`` the full-resolution HU volume (:func:`read_hu_volume`'s layout) and its affine are also put in
    ``data[hu_key]`` (a MetaTensor), for overlays at inference. The inverse resamples back onto the series' own grid.
    """

    def __init__(
        self,
        keys: str | list[str],
        *,
        pixdim: tuple[float, float, float],
        antialias: bool = False,
        hu_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(pixdim) != 3 or any(not float(p) > 0 for p in pixdim):
            raise ValueError(f"pixdim must be three positive numbers, got {pixdim!r}")
        self.pixdim = tuple(float(p) for p in pixdim)
        self.antialias = bool(antialias)
        self.hu_key = hu_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], Mapping) and "nifti" in d[key]:  # a validated NIfTI volume (preprocessing/nifti.py)
                from preprocessing.nifti import read_resampled_nifti, source_geometry

                out = read_resampled_nifti(d[key], self.pixdim, keep_hu=self.hu_key is not None)
                orig_size, orig_affine = source_geometry(d[key])
            else:
                series = as_series(d[key])
                out = read_resampled_volume(
                    series, self.pixdim, antialias=self.antialias, keep_hu=self.hu_key is not None
                )
                orig_size, orig_affine = series.shape, series_affine(series)
            image = MetaTensor(
                torch.from_numpy(out.volume[None]),
                affine=torch.as_tensor(out.affine, dtype=torch.float64),
                meta={MetaKeys.SPACE: SpaceKeys.RAS},
            )
            self.push_transform(image, orig_size=orig_size, extra_info={"affine": orig_affine})
            d[key] = image
            if self.hu_key is not None and out.hu is not None:
                d[self.hu_key] = MetaTensor(
                    torch.from_numpy(out.hu[None]),
                    affine=torch.as_tensor(out.hu_affine, dtype=torch.float64),
                    meta={MetaKeys.SPACE: SpaceKeys.RAS},
                )
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample ``data[key]`` (on the model grid) back onto the series' grid: (Columns, Rows, slices), its affine."""
        from monai.transforms import SpatialResample

        d = dict(data)
        for key in self.key_iterator(d):
            transform = self.pop_transform(d[key])
            resample = SpatialResample(mode="bilinear", padding_mode="border")
            with resample.trace_transform(False):
                d[key] = resample(
                    d[key],
                    dst_affine=torch.as_tensor(
                        np.asarray(transform[TraceKeys.EXTRA_INFO]["affine"]), dtype=torch.float64
                    ),
                    spatial_size=[int(n) for n in transform[TraceKeys.ORIG_SIZE]],
                )
        return d


class AboveThreshold:
    """Picklable foreground selector for ``CropForegroundd`` (the body: voxels above a HU threshold)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


def deterministic_transforms(cfg: PipelineConfig, *, key: str = "image", hu_key: str | None = None) -> list:
    """Load the series onto the RAS grid at ``target_spacing_mm``, crop to the body, window HU to [0, 1], fix the size.

    The first step (:class:`LoadResampledCTd`) reads the files straight onto the grid that
    ``Orientationd("RAS")`` + ``Spacingd(target_spacing_mm, "bilinear", "border")`` would give, with their values,
    without building the full-resolution volume; ``hu_key`` also keeps that volume (inference draws overlays on it).
    """
    return [
        LoadResampledCTd(keys=key, pixdim=cfg.target_spacing_mm, antialias=False, hu_key=hu_key),
        CropForegroundd(
            keys=key,
            source_key=key,
            select_fn=AboveThreshold(cfg.body_threshold_hu),
            margin=2,
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        ScaleIntensityRanged(keys=key, a_min=cfg.hu_min, a_max=cfg.hu_max, b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd(keys=key, spatial_size=cfg.input_size, mode="constant", value=0.0),
        EnsureTyped(keys=key, dtype=torch.float32, track_meta=False),
    ]


def random_transforms(
    cfg: PipelineConfig, *, key: str = "image", noise_on_device: bool = False, augment: AugmentConfig | None = None
) -> list:
    """Training augmentation after the cache: intensity (HU shift, contrast scale, noise, blur/sharpen), geometry
    (rotation, zoom, left-right flip) and resolution simulation, each with its own probability (:class:`AugmentConfig`,
    default on). Shape and dtype are kept; geometry pads with 0 (air after windowing).

    With ``noise_on_device`` the noise is drawn by torch on the image's device (:class:`RandGaussianNoiseOnDeviced`,
    same distribution) instead of as a host-side numpy array: the form :class:`BatchAugment` uses on a GPU. Every
    other transform runs on torch tensors where they lie, so the GPU path applies the same set.
    """
    aug = AugmentConfig() if augment is None else augment
    if not aug.enabled:
        return []
    window = cfg.hu_max - cfg.hu_min
    noise = RandGaussianNoiseOnDeviced if noise_on_device else RandGaussianNoised
    rad = float(np.deg2rad(aug.rotate_deg))
    return [
        RandAffined(
            keys=key,
            prob=aug.affine_prob,
            rotate_range=(rad, rad, rad),
            scale_range=(aug.scale,) * 3,
            mode="bilinear",
            padding_mode="zeros",
        ),
        RandFlipd(keys=key, prob=aug.flip_prob, spatial_axis=0),
        RandSimulateLowResolutiond(keys=key, prob=aug.low_res_prob, zoom_range=aug.low_res_zoom),
        RandShiftIntensityd(keys=key, offsets=aug.hu_shift / window, prob=aug.intensity_prob),
        RandScaleIntensityd(keys=key, factors=aug.intensity_scale, prob=aug.intensity_prob),
        RandGaussianSmoothd(
            keys=key, sigma_x=aug.blur_sigma, sigma_y=aug.blur_sigma, sigma_z=aug.blur_sigma, prob=aug.blur_prob
        ),
        RandGaussianSharpend(keys=key, alpha=aug.sharpen_alpha, prob=aug.sharpen_prob),
        noise(keys=key, prob=aug.noise_prob, std=aug.noise_std),
        EnsureTyped(keys=key, dtype=torch.float32, track_meta=False),
    ]


class RandGaussianNoiseOnDevice(RandGaussianNoise):
    """MONAI's ``RandGaussianNoise`` whose noise is drawn by torch on the image's own device.

    The decision and the spread come from the transform's MONAI random state (``set_random_state`` seeds it), so
    runs are reproducible; the noise itself comes from a torch generator seeded from that state. On a GPU this
    avoids drawing a full volume of numpy normals on the host and copying it over for every sample.
    """

    def randomize(self, img: torch.Tensor, mean: float | None = None) -> None:  # type: ignore[override]
        RandomizableTransform.randomize(self, None)
        if not self._do_transform:
            return None
        std = self.R.uniform(0, self.std) if self.sample_std else self.std
        seed = int(self.R.randint(0, 2**31 - 1))
        device = img.device if isinstance(img, torch.Tensor) else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(seed)
        dtype = torch.float32 if self.dtype is None else torch.from_numpy(np.zeros(0, dtype=self.dtype)).dtype
        noise = torch.randn(tuple(img.shape), generator=generator, device=device, dtype=dtype)
        self.noise = noise.mul_(std).add_(self.mean if mean is None else mean)
        return None


class RandGaussianNoiseOnDeviced(RandGaussianNoised):
    """Dictionary form of :class:`RandGaussianNoiseOnDevice` (same arguments as MONAI's ``RandGaussianNoised``)."""

    def __init__(
        self,
        keys,
        prob: float = 0.1,
        mean: float = 0.0,
        std: float = 0.1,
        dtype=np.float32,
        allow_missing_keys: bool = False,
        sample_std: bool = True,
    ) -> None:
        super().__init__(
            keys,
            prob=prob,
            mean=mean,
            std=std,
            dtype=dtype,
            allow_missing_keys=allow_missing_keys,
            sample_std=sample_std,
        )
        self.rand_gaussian_noise = RandGaussianNoiseOnDevice(
            mean=mean, std=std, prob=1.0, dtype=dtype, sample_std=sample_std
        )


@contextmanager
def metadata_tracking(enabled: bool) -> Iterator[None]:
    """Temporarily switch MONAI's metadata tracking (``set_track_meta``) and restore it afterwards."""
    previous = get_track_meta()
    set_track_meta(enabled)
    try:
        yield
    finally:
        set_track_meta(previous)


class BatchAugment:
    """The training augmentation applied to a collated batch where it lies (a GPU when training on one).

    Each sample gets its own draw of :func:`random_transforms` (per-sample randomness as in the loader), and the
    result is a plain tensor: metadata is not tracked inside the training step. ``seed`` makes the sequence
    of draws reproducible.
    """

    def __init__(self, cfg: PipelineConfig, *, seed: int, key: str = "image") -> None:
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.key = key
        self.transform = Compose(random_transforms(cfg, key=key, noise_on_device=True))
        self.transform.set_random_state(seed=int(seed))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> the same shape, each sample augmented independently."""
        if images.ndim != 5:
            raise ValueError(f"BatchAugment expects a (B, C, X, Y, Z) batch, got shape {tuple(images.shape)}")
        images = images.as_tensor() if isinstance(images, MetaTensor) else images
        with metadata_tracking(False):
            out = [self.transform({self.key: sample})[self.key] for sample in images]
        return torch.stack([o.as_tensor() if isinstance(o, MetaTensor) else o for o in out])
