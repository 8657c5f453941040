"""Stage 4: the pipeline configuration and the deterministic / random MONAI transforms."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from preprocessing.discover import discover
from preprocessing.transforms import (
    PIPELINE_VERSION,
    AboveThreshold,
    AugmentConfig,
    PipelineConfig,
    deterministic_transforms,
    random_transforms,
)
from preprocessing.validate import validate_series
from preprocessing.volume import series_to_dict

SMALL = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))


def _item(root: Path) -> dict:
    [headers] = discover(root).series.values()
    return {"image": series_to_dict(validate_series(headers)), "label": 1}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"target_spacing_mm": (0.0, 4.0, 4.0)}, r"\(0\.0, 4\.0, 4\.0\)"),
        ({"target_spacing_mm": (4.0, -1.0, 4.0)}, "-1.0"),
        ({"target_spacing_mm": (4.0, 4.0)}, r"target_spacing_mm.*\(4\.0, 4\.0\)"),
        ({"input_size": (4, 16, 16)}, r"input_size.*\(4, 16, 16\)"),
        ({"input_size": (16, 16)}, r"input_size.*\(16, 16\)"),
        ({"hu_min": 400.0, "hu_max": 400.0}, r"hu_min \(400\.0\)"),
        ({"hu_min": 500.0, "hu_max": -500.0, "body_threshold_hu": 0.0}, r"hu_min \(500\.0\)"),
        ({"body_threshold_hu": -1200.0}, r"body_threshold_hu \(-1200\.0\)"),
        ({"body_threshold_hu": 401.0}, r"body_threshold_hu \(401\.0\)"),
    ],
)
def test_bad_pipeline_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PipelineConfig(**kwargs)


def test_fingerprint_is_stable_for_equal_configs():
    a = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))
    b = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"target_spacing_mm": (4.0, 4.0, 5.0)},
        {"input_size": (16, 16, 24)},
        {"hu_min": -1024.0},
        {"hu_max": 500.0},
        {"body_threshold_hu": -400.0},
    ],
)
def test_fingerprint_changes_with_every_parameter(change):
    assert dataclasses.replace(SMALL, **change).fingerprint() != SMALL.fingerprint()


def test_to_dict_records_every_parameter_and_the_version():
    d = SMALL.to_dict()
    assert d["pipeline_version"] == PIPELINE_VERSION
    assert {f.name for f in dataclasses.fields(PipelineConfig)} <= set(d)
    assert tuple(d["input_size"]) == (16, 16, 16)


def test_above_threshold_selects_voxels_strictly_above():
    select = AboveThreshold(-500)
    out = select(torch.tensor([-1000.0, -500.0, -499.0, 300.0]))
    assert out.tolist() == [False, False, True, True]


def test_deterministic_pipeline_gives_model_input_shape_and_range(make_series, dicom_root):
    make_series("a", n_slices=14, rows=24, cols=20)
    item = _item(dicom_root)

    out = Compose(deterministic_transforms(SMALL))(item)

    image = out["image"]
    assert isinstance(image, torch.Tensor)
    assert tuple(image.shape) == (1, *SMALL.input_size)
    assert image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image.max()) > 0.5  # the body is in there, not only padding
    assert out["label"] == 1


def test_deterministic_pipeline_is_deterministic(make_series, dicom_root):
    make_series("a", n_slices=12)
    item = _item(dicom_root)

    first = Compose(deterministic_transforms(SMALL))(dict(item))["image"]
    second = Compose(deterministic_transforms(SMALL))(dict(item))["image"]

    assert torch.equal(first, second)


def test_windowing_follows_hu_min_and_hu_max(make_series, dicom_root):
    hu = np.full((12, 16, 16), 40.0)  # homogeneous soft tissue everywhere
    make_series("a", hu=hu)
    item = _item(dicom_root)

    out = Compose(deterministic_transforms(SMALL))(item)["image"]

    expected = (40.0 - SMALL.hu_min) / (SMALL.hu_max - SMALL.hu_min)
    # The pipeline pads with 0 outside the (small) body; all body voxels have the windowed value.
    body = out[out > 0]
    assert body.numel() > 0
    np.testing.assert_allclose(body.numpy(), expected, atol=1e-4)


def test_same_object_in_another_orientation_gives_the_same_model_input(make_series, dicom_root, edit_dicom):
    rows, dy = 16, 2.0
    a = make_series("a", n_slices=12, rows=rows, pixel_spacing_mm=(dy, 2.0))
    b = make_series("b", hu=a.hu[:, ::-1, :], pixel_spacing_mm=(dy, 2.0), origin_mm=a.origin_mm)
    x0, y0, z0 = a.origin_mm
    for k, path in enumerate(b.paths):

        def change(ds, k=k):
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "-1", "0"]
            ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0 + (rows - 1) * dy:.4f}", f"{z0 + k * 2.5:.4f}"]

        edit_dicom(path, change)

    out_a = Compose(deterministic_transforms(SMALL))(_item(a.folder))["image"]
    out_b = Compose(deterministic_transforms(SMALL))(_item(b.folder))["image"]

    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=0)


def test_random_transforms_keep_shape_and_are_applied_after_the_deterministic_ones(make_series, dicom_root):
    make_series("a", n_slices=12)
    pipeline = Compose(deterministic_transforms(SMALL) + random_transforms(SMALL))
    pipeline.set_random_state(seed=0)

    outputs = [pipeline(_item(dicom_root))["image"] for _ in range(4)]

    assert all(tuple(o.shape) == (1, *SMALL.input_size) for o in outputs)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])
    assert len(random_transforms(SMALL)) == 9  # 8 augmentations + the final plain-float32 step


# --- #18: random augmentation on the batch where it lies (the GPU when training on one) ---------------------------


def test_batch_augment_draws_per_sample_is_reproducible_and_returns_a_plain_tensor():
    from monai.data import MetaTensor, get_track_meta

    from preprocessing.transforms import BatchAugment

    images = MetaTensor(torch.rand(8, 1, 16, 16, 8))
    first = BatchAugment(SMALL, seed=5)(images)
    assert type(first) is torch.Tensor and first.shape == images.shape and first.dtype == torch.float32
    assert get_track_meta()  # the global switch is restored after the batch
    assert torch.equal(BatchAugment(SMALL, seed=5)(images), first)  # same seed, same draws
    assert not torch.equal(BatchAugment(SMALL, seed=6)(images), first)
    changed = [not torch.equal(first[i], images.as_tensor()[i]) for i in range(8)]
    plain = images.as_tensor()
    same_as_first = [torch.allclose(first[i] - plain[i], first[0] - plain[0], atol=1e-4) for i in range(1, 8)]
    assert any(changed) and not all(same_as_first)  # each sample draws its own augmentation


@pytest.mark.parametrize(
    ("kwargs", "shape", "needle"),
    [({"seed": -1}, (2, 1, 8, 8, 8), "seed"), ({"seed": 0}, (1, 8, 8, 8), "B, C, X, Y, Z")],
)
def test_batch_augment_refuses_bad_input(kwargs, shape, needle):
    from preprocessing.transforms import BatchAugment

    with pytest.raises(ValueError, match=needle):
        BatchAugment(SMALL, **kwargs)(torch.zeros(shape))


def test_noise_drawn_on_the_device_has_monais_distribution():
    from monai.transforms import RandGaussianNoise

    from preprocessing.transforms import RandGaussianNoiseOnDevice

    image = torch.zeros(1, 32, 32, 32)
    ours, monai = (
        RandGaussianNoiseOnDevice(prob=1.0, std=0.1).set_random_state(0),
        RandGaussianNoise(prob=1.0, std=0.1).set_random_state(0),
    )
    a, b = ours(image), monai(image)
    assert a.device == image.device and a.dtype == torch.float32
    # Same spread (the std is drawn from the same MONAI random state), independent draws of the noise itself.
    assert abs(float(a.std()) - float(torch.as_tensor(b).std())) < 0.01 and abs(float(a.mean())) < 0.01
    assert torch.equal(RandGaussianNoiseOnDevice(prob=0.0, std=0.1)(image), image)  # prob is honoured


def test_random_transforms_on_device_differ_only_in_the_noise_transform():
    from preprocessing.transforms import RandGaussianNoiseOnDeviced

    host, device = random_transforms(SMALL), random_transforms(SMALL, noise_on_device=True)
    names = lambda ts: [type(t).__name__ for t in ts]  # noqa: E731
    noise_at = names(host).index("RandGaussianNoised")
    assert (
        names(host)[:noise_at] == names(device)[:noise_at]
        and names(host)[noise_at + 1 :] == names(device)[noise_at + 1 :]
    )
    assert isinstance(device[noise_at], RandGaussianNoiseOnDeviced) and device[noise_at].prob == host[noise_at].prob


# --- #20.3: robust training (intensity, geometry, resolution augmentation; on by default) ---------------------------


def test_training_chain_is_deterministic_then_random_with_the_cache_boundary_between(tmp_path):
    from monai.transforms import Randomizable

    from preprocessing.cache import make_dataset

    dataset = make_dataset([], SMALL, tmp_path, augment=True)
    chain = dataset.images.transform.transforms
    n_det = len(deterministic_transforms(SMALL))
    assert not any(
        isinstance(t, Randomizable) for t in chain[:n_det]
    )  # all cached (PersistentDataset stops at the first random one)
    assert isinstance(chain[n_det], Randomizable)
    kinds = {type(t).__name__ for t in chain[n_det:]}
    for expected in (
        "RandAffined",
        "RandFlipd",
        "RandSimulateLowResolutiond",
        "RandShiftIntensityd",
        "RandScaleIntensityd",
        "RandGaussianSmoothd",
        "RandGaussianSharpend",
        "RandGaussianNoised",
    ):
        assert expected in kinds, f"{expected} missing from the default training chain"
    assert not any(
        isinstance(t, Randomizable)
        for t in make_dataset([], SMALL, tmp_path, augment=False).images.transform.transforms
    )


def _phantom() -> torch.Tensor:
    """A window-scaled body: an off-centre ellipsoid in [0.2, 0.8] with a bright spot, air (0) outside."""
    x, y, z = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in (24, 24, 16)), indexing="ij")
    body = (((x - 0.1) / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1).float()
    spot = ((x - 0.4) ** 2 + (y - 0.1) ** 2 + z**2 < 0.05).float()
    return (0.2 + 0.4 * body * (1 + torch.sin(6 * x) * 0.5) + 0.2 * spot)[None] * body[None]


ALWAYS = AugmentConfig(
    flip_prob=1.0,
    intensity_prob=1.0,
    noise_prob=1.0,
    blur_prob=1.0,
    sharpen_prob=1.0,
    affine_prob=1.0,
    low_res_prob=1.0,
)


def _bound_ok(name: str, image: torch.Tensor, out: torch.Tensor, aug: AugmentConfig, window: float) -> bool:
    diff = out - image
    if name == "RandShiftIntensityd":  # one offset for the whole volume, at most hu_shift HU
        return float(diff.max() - diff.min()) < 1e-5 and abs(float(diff.mean())) <= aug.hu_shift / window + 1e-6
    if name == "RandScaleIntensityd":  # out = image * (1 + f), |f| <= intensity_scale
        f = float((out.sum() / image.sum()) - 1)
        return abs(f) <= aug.intensity_scale + 1e-6 and torch.allclose(out, image * (1 + f), atol=1e-5)
    if name == "RandGaussianNoised":
        return float(diff.std()) <= aug.noise_std * 1.1
    if name == "RandFlipd":
        return torch.equal(out, image.flip(1))
    if name in (
        "RandGaussianSmoothd",
        "RandAffined",
        "RandSimulateLowResolutiond",
    ):  # interpolation/smoothing: no new extremes
        return float(out.min()) >= float(image.min()) - 0.05 and float(out.max()) <= float(image.max()) + 0.05
    if name == "RandGaussianSharpend":  # unsharp mask: edges overshoot, but bounded by alpha times the local contrast
        return float(diff.abs().max()) <= aug.sharpen_alpha[1] * float(image.max() - image.min())
    return name == "EnsureTyped" and torch.equal(out, image)


@pytest.mark.parametrize("index", range(len(random_transforms(SMALL))))
def test_each_augmentation_changes_the_input_within_its_bounds_and_keeps_shape_and_dtype(index):
    transform = random_transforms(SMALL, augment=ALWAYS)[index]
    name = type(transform).__name__
    image = _phantom()
    window = SMALL.hu_max - SMALL.hu_min
    changed = 0
    for seed in range(5):
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        out = transform({"image": image.clone()})["image"]
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        assert tuple(out.shape) == tuple(image.shape) and out.dtype == torch.float32, name
        assert _bound_ok(name, image, out, ALWAYS, window), f"{name} (seed {seed}) went beyond its stated bound"
        changed += not torch.allclose(out, image, atol=1e-4)
    assert changed >= (0 if name == "EnsureTyped" else 4), (
        f"{name} left the input unchanged in {5 - changed} of 5 draws"
    )


def test_augmentation_is_on_by_default_and_can_be_switched_off():
    assert AugmentConfig().enabled and random_transforms(SMALL)
    assert random_transforms(SMALL, augment=AugmentConfig(enabled=False)) == []


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"hu_shift": -5.0}, r"hu_shift .*-5\.0"),
        ({"noise_std": "0.1"}, r"noise_std .*'0\.1'"),
        ({"intensity_scale": 1.5}, r"intensity_scale"),
        ({"rotate_deg": 90.0}, r"rotate_deg .*90\.0"),
        ({"blur_sigma": (1.0, 0.5)}, r"blur_sigma .*\(1\.0, 0\.5\)"),
        ({"low_res_zoom": (0.5, 2.0)}, r"low_res_zoom"),
        ({"sharpen_alpha": (3.0,)}, r"sharpen_alpha"),
        ({"affine_prob": 1.5}, r"affine_prob .*1\.5"),
        ({"flip_prob": -0.1}, r"flip_prob"),
    ],
)
def test_bad_augment_config_names_the_setting_and_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AugmentConfig(**kwargs)


def test_batch_augment_applies_the_same_set_as_the_loader():
    from preprocessing.transforms import BatchAugment

    names = [type(t).__name__ for t in BatchAugment(SMALL, seed=0).transform.transforms]
    assert names == [type(t).__name__ for t in random_transforms(SMALL, noise_on_device=True)]
