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
    assert len(random_transforms(SMALL)) == 3


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
    flipped = [torch.allclose(first[i], images.as_tensor()[i].flip(1), atol=0.2) for i in range(8)]
    assert any(changed) and not all(flipped) and any(flipped)  # each sample draws its own flip/scale/noise


@pytest.mark.parametrize(("kwargs", "shape", "needle"), [({"seed": -1}, (2, 1, 8, 8, 8), "seed"),
                                                         ({"seed": 0}, (1, 8, 8, 8), "B, C, X, Y, Z")])  # fmt: skip
def test_batch_augment_refuses_bad_input(kwargs, shape, needle):
    from preprocessing.transforms import BatchAugment

    with pytest.raises(ValueError, match=needle):
        BatchAugment(SMALL, **kwargs)(torch.zeros(shape))


def test_noise_drawn_on_the_device_has_monais_distribution():
    from monai.transforms import RandGaussianNoise

    from preprocessing.transforms import RandGaussianNoiseOnDevice

    image = torch.zeros(1, 32, 32, 32)
    ours, monai = RandGaussianNoiseOnDevice(prob=1.0, std=0.1).set_random_state(0), RandGaussianNoise(prob=1.0, std=0.1).set_random_state(0)
    a, b = ours(image), monai(image)
    assert a.device == image.device and a.dtype == torch.float32
    # Same spread (the std is drawn from the same MONAI random state), independent draws of the noise itself.
    assert abs(float(a.std()) - float(torch.as_tensor(b).std())) < 0.01 and abs(float(a.mean())) < 0.01
    assert torch.equal(RandGaussianNoiseOnDevice(prob=0.0, std=0.1)(image), image)  # prob is honoured


def test_random_transforms_on_device_differ_only_in_the_noise_transform():
    from preprocessing.transforms import RandGaussianNoiseOnDeviced

    host, device = random_transforms(SMALL), random_transforms(SMALL, noise_on_device=True)
    assert [type(t).__name__ for t in host[:2]] == [type(t).__name__ for t in device[:2]]
    assert isinstance(device[2], RandGaussianNoiseOnDeviced) and device[2].prob == host[2].prob
