"""inference.explain: target layers, the heat map mapped back to the CT grid, key slices, overlays, and the heat-map
hit rate on planted lesions with a briefly trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from test_inference_predict import TEST_PIPELINE, make_bundle

from inference.explain import (
    CANDIDATE_LAYERS,
    GradCamExplainer,
    _local_maxima,
    cam_to_original_grid,
    display_slice,
    heat_peaks,
    render_overlay,
    resample_to_grid,
    select_key_slices,
)
from inference.predict import PREDICTION_NAME, prepare_input, run_predict
from inference.wording import heat_map_colour_label, heat_map_legend
from models.factory import ModelConfig, build_model
from preprocessing.discover import discover
from preprocessing.transforms import PipelineConfig
from preprocessing.validate import validate_series
from preprocessing.volume import as_series, read_hu_volume
from synthetic import phantom
from synthetic.dicom_writer import PatientIdentity, write_ct_series

DEFAULT_INPUT = (64, 64, 48)  # the run configuration's default input size


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("smallcnn", "backbone.features.14"),  # 8x8x6 at 64x64x48
        ("densenet121", "backbone.features.transition2.relu"),  # transition3 is only 4x4x3 here
        ("resnet10", "backbone.layer3"),  # layer4: 4x4x3
        ("resnet18", "backbone.layer3"),
    ],
)
def test_target_layer_per_backbone(name, expected):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name))
    names = dict(model.named_modules())
    assert all(layer in names for layer in CANDIDATE_LAYERS[name])
    explainer = GradCamExplainer(model, model_name=name, input_size=DEFAULT_INPUT)
    assert explainer.target_layer == expected and min(explainer.map_size) >= 5
    cam = explainer(torch.rand(1, 1, *DEFAULT_INPUT), class_index=1)
    assert cam.shape == DEFAULT_INPUT and bool((cam >= 0).all()) and bool(torch.isfinite(cam).all())
    # The caller's network is untouched (no hooks, ReLUs still in place).
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_unknown_model_or_layer_is_named():
    model = build_model(ModelConfig(name="smallcnn"))
    with pytest.raises(ValueError, match="no Grad-CAM target layer known for model 'mystery'"):
        GradCamExplainer(model, model_name="mystery", input_size=(16, 16, 16))
    with pytest.raises(ValueError, match="backbone.nope"):
        GradCamExplainer(model, model_name="smallcnn", input_size=(16, 16, 16), target_layer="backbone.nope")


def test_resampling_through_affines_is_exact_for_a_linear_map():
    rng = np.random.default_rng(0)
    src_affine = np.array([[0.0, 5.0, 0.0, -40.0], [-4.0, 0.0, 0.0, 30.0], [0.0, 0.0, 6.0, -90.0], [0, 0, 0, 1.0]])
    shape_src = (12, 10, 9)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape_src], indexing="ij"), -1)
    world = idx @ src_affine[:3, :3].T + src_affine[:3, 3]
    coef = rng.normal(size=3)
    source = torch.as_tensor(world @ coef, dtype=torch.float32)
    dst_affine = np.array([[-1.5, 0, 0, 5.0], [0, -1.2, 0, 8.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1.0]])
    shape = (17, 15, 11)
    out = resample_to_grid(source, src_affine, shape, dst_affine, chunk_voxels=100)  # many small slabs
    didx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    truth = (didx @ dst_affine[:3, :3].T + dst_affine[:3, 3]) @ coef
    at = didx @ (np.linalg.inv(src_affine) @ dst_affine)[:3, :3].T + (np.linalg.inv(src_affine) @ dst_affine)[:3, 3]
    inside = np.all((at >= 0) & (at <= np.array(shape_src) - 1), axis=-1)
    assert inside.sum() > 100
    np.testing.assert_allclose(out[inside], truth[inside], atol=1e-3)
    assert np.all(out[~np.all((at > -1) & (at < np.array(shape_src)), axis=-1)] == 0)


ORIENTATIONS = {
    "standard": None,
    "mirrored": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0],  # rows run to the patient's right, columns anterior
    "transposed": [0.0, 1.0, 0.0, 1.0, 0.0, 0.0],  # rows run posterior, columns left; normal points to the feet
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_heat_map_maps_back_to_the_planted_voxel(tmp_path, series_writer, edit_dicom, orientation):
    """A fake heat map (the model input itself) peaks at a bright blob; mapped back, it peaks at the blob's voxel."""
    hu = np.full((20, 40, 48), -1000, dtype=np.int32)
    hu[:, 4:36, 4:44] = 0  # a body, so the crop keeps it
    hu[12:15, 9:12, 29:32] = 1000  # the blob: off-centre in every axis
    series = series_writer(tmp_path / "in" / "s", hu=hu, pixel_spacing_mm=(3.0, 3.5), slice_spacing_mm=5.0)
    if ORIENTATIONS[orientation] is not None:
        for path in series.paths:
            edit_dicom(path, lambda ds: setattr(ds, "ImageOrientationPatient", ORIENTATIONS[orientation]))
    validated = validate_series(next(iter(discover(tmp_path / "in").series.values())))
    pipeline = PipelineConfig(input_size=(32, 32, 24), target_spacing_mm=(4.0, 4.0, 4.0))  # crops x, pads z
    prepared = prepare_input(validated, pipeline)
    blob = np.argwhere(prepared.hu > 500).mean(axis=0)
    fake_cam = prepared.image[0, 0]
    results = {}
    for method in ("auto", "inverse", "affine"):
        heat, used = cam_to_original_grid(
            fake_cam, prepared.grid, prepared.transforms, shape=prepared.hu.shape, affine=prepared.affine, method=method
        )
        assert heat.shape == prepared.hu.shape
        peak = np.argwhere(heat >= heat.max() - 1e-6).mean(axis=0)
        distance_mm = np.linalg.norm(prepared.affine[:3, :3] @ (peak - blob))
        assert distance_mm <= 4.0, (method, peak, blob)
        results[method] = heat
    # MONAI's full inverse and the cheap one agree wherever the model saw the image.
    np.testing.assert_allclose(results["auto"], results["inverse"], atol=2e-3)


def test_key_slices_strongest_first_and_apart():
    heat = np.zeros((4, 4, 12), dtype=np.float32)
    for k, value in {5: 1.0, 6: 0.95, 4: 0.9, 9: 0.5, 1: 0.2}.items():
        heat[1, 2, k] = value
    # 6 and 4 are the shoulders of the peak at 5; 1 is below the drawing threshold (30 % of the maximum).
    assert select_key_slices(heat, count=3, min_gap=2) == (5, 9)
    assert select_key_slices(heat, count=3, min_gap=2, min_relative=0.1) == (5, 9, 1)
    assert select_key_slices(heat, count=1) == (5,)


def _blob(shape, centre, radius, peak):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return peak * np.exp(-(((grid - np.asarray(centre)) ** 2).sum(-1)) / (2 * radius**2)).astype(np.float32)


def test_planted_hot_regions_choose_their_slices():
    """A broad strong region and a weaker separate one: one slice through each, not three through the strong one."""
    shape = (24, 24, 30)
    heat = _blob(shape, (6, 8, 10), 4.0, 1.0) + _blob(shape, (18, 15, 22), 1.5, 0.6)
    peaks = heat_peaks(heat, count=3, min_gap=3)
    assert [p.voxel for p in peaks] == [(6, 8, 10), (18, 15, 22)]
    assert peaks[0].value > peaks[1].value
    assert select_key_slices(heat, count=3, min_gap=3) == (10, 22)
    # The old rule (hottest slices at least min_gap apart) would have taken 10, 13 and 7 from the first region.
    per_slice = heat.reshape(-1, shape[2]).max(axis=0)
    assert per_slice[13] > per_slice[22] and per_slice[7] > per_slice[22]


def test_two_regions_on_one_slice_give_one_key_slice():
    shape = (24, 24, 16)
    heat = _blob(shape, (5, 12, 8), 2.0, 1.0) + _blob(shape, (19, 12, 8), 2.0, 0.9)
    assert select_key_slices(heat, count=3, min_gap=2) == (8,)


def test_empty_map_gives_the_middle_slice():
    assert heat_peaks(np.zeros((2, 2, 7))) == ()
    assert select_key_slices(np.zeros((2, 2, 7)), count=3) == (3,)
    assert select_key_slices(-np.ones((2, 2, 7)), count=3) == (3,)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_map_is_refused_with_a_reason(bad):
    heat = np.zeros((4, 4, 6), dtype=np.float32)
    heat[1, 1, 2] = bad
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(NaN or infinity\)"):
        select_key_slices(heat)


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 0), (2, 3, 4, 5)])
def test_wrong_shape_is_refused(shape):
    with pytest.raises(ValueError, match="must be 3-D"):
        heat_peaks(np.zeros(shape))


def test_bad_count_or_gap_is_refused():
    with pytest.raises(ValueError, match="count and min_gap"):
        heat_peaks(np.ones((2, 2, 2)), count=0)


def test_local_maxima_across_slabs_match_one_pass():
    rng = np.random.default_rng(0)
    heat = rng.random((6, 5, 20)).astype(np.float32)
    assert np.array_equal(_local_maxima(heat, chunk_slices=3), _local_maxima(heat, chunk_slices=64))


def test_legend_states_method_and_colours():
    legend = heat_map_legend("Grad-CAM++", "covid")
    assert "Grad-CAM++" in legend and "red" in legend and "blue" in legend and "COVID-19-like" in legend
    assert "not an outline of disease" in legend
    assert "occlusion" in heat_map_legend("Occlusion", "normal")
    assert "red" in heat_map_colour_label()


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-0.8, -0.8, 2.0, 1.0]),  # DICOM axial (LPS) as read_hu_volume gives it
        np.diag([0.8, 0.8, 2.0, 1.0]),  # mirrored in-plane
        np.array([[0, -0.8, 0, 0], [-0.8, 0, 0, 0], [0, 0, -2.0, 0], [0, 0, 0, 1.0]]),  # transposed, feet first
    ],
)
def test_axial_display_is_radiological(affine):
    """A marker at the patient's right-anterior shows on the image's left-top, labelled R/L/A/P."""
    affine = affine.copy()
    affine[:3, 3] = -affine[:3, :3] @ np.array([9.5, 9.5, 1.0])  # slice 1 centred on the world origin
    volume = np.zeros((20, 20, 3), dtype=np.float32)
    marker = np.rint(np.linalg.inv(affine) @ np.array([5.0, 5.0, 0.0, 1.0]))[:3].astype(int)  # RAS: right, anterior
    assert marker[2] == 1
    volume[marker[0], marker[1], 1] = 1.0
    image, labels, spacing, _ = display_slice(volume, affine, 1)
    assert labels == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert spacing == (0.8, 0.8)
    row, col = np.argwhere(image == 1.0)[0]
    centre = (np.array(image.shape) - 1) / 2
    assert col < centre[1] and row < centre[0]


def test_render_overlay_writes_png(tmp_path):
    hu = np.full((30, 24, 5), -800.0, dtype=np.float32)
    heat = np.zeros_like(hu)
    heat[10:15, 8:12, 2] = 1.0
    path = render_overlay(hu, heat, np.diag([-1.2, -1.4, 5.0, 1.0]), 2, tmp_path / "o.png", title="test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 300
        rgb = np.asarray(image.convert("RGB"))
    assert (rgb[..., 0].astype(int) - rgb[..., 2].astype(int)).max() > 100  # some red heat is drawn


# --- hit rate on planted lesions -----------------------------------------------------------------------------------

ROWS, PIXEL_MM, SLICE_MM = 48, 8.0, 10.0
CLASSES = phantom.DIAGNOSES


def write_case(folder: Path, seed: int, diagnosis: str, burden: float) -> np.ndarray | None:
    """One synthetic chest CT study; returns where the phantom put lesions (bool, phantom axes) or None."""
    rng = np.random.default_rng(seed)
    study = phantom.render_chest(
        shape=(round(160 / SLICE_MM), ROWS, ROWS),
        pixel_spacing_mm=(PIXEL_MM, PIXEL_MM),
        slice_spacing_mm=SLICE_MM,
        diagnosis=diagnosis,
        burden=burden,
        noise_hu=15.0,
        rng=rng,
        randomise=False,  # the canonical phantom: the bounds below were measured on it (a model trained for seconds)
    )
    hu = study.hu
    uid = f"1.2.826.0.1.3680043.10.997.{seed}"
    write_ct_series(
        folder,
        hu,
        pixel_spacing_mm=(PIXEL_MM, PIXEL_MM),
        slice_spacing_mm=SLICE_MM,
        origin_mm=(-(ROWS - 1) / 2 * PIXEL_MM, -(ROWS - 1) / 2 * PIXEL_MM, -200.0),
        study_instance_uid=uid,
        series_instance_uid=uid + ".1",
        patient=PatientIdentity("TEST^HIT", "HIT", "19500101", "F", "070Y"),
        uid_entropy=[uid],
    )
    return study.lesion_mask if study.lesion_mask.any() else None


def train_briefly(root: Path, *, n: int = 30, epochs: int = 20) -> dict[str, torch.Tensor]:
    """A smallcnn trained for seconds on ``n`` synthetic studies (balanced classes), through the real pipeline."""
    rng = np.random.default_rng(123)
    labels = {}
    for i in range(n):
        label = i % 3
        write_case(root / f"c{i:03d}", 1000 + i, CLASSES[label], 0.0 if label == 2 else float(rng.uniform(0.15, 0.6)))
        labels[f"c{i:03d}"] = label
    images, targets = [], []
    for headers in discover(root).series.values():
        series = validate_series(headers)
        images.append(prepare_input(series, TEST_PIPELINE).image[0])
        targets.append(labels[Path(series.paths[0]).parent.name])
    x, y = torch.stack(images), torch.tensor(targets)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn"))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 8):
            idx = order[start : start + 8]
            batch = x[idx].clone()
            flip = torch.rand(len(idx), generator=generator) < 0.5
            batch[flip] = batch[flip].flip(2)  # left-right: lesions on either side
            loss = torch.nn.functional.cross_entropy(model(batch).logits, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    # BatchNorm statistics of the final weights (as sites do before sending them); without this a short run can
    # leave stale statistics and an eval-mode model that predicts one class.
    torch.optim.swa_utils.update_bn([x[i : i + 8] for i in range(0, len(x), 8)], _Images(model))
    return model.state_dict()


class _Images(torch.nn.Module):
    """The multi-task network as ``update_bn`` calls it (one tensor in)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Run the whole prediction stage with a briefly trained model on studies with known lesions."""
    root = tmp_path_factory.mktemp("hit-rate")
    state = train_briefly(root / "train")
    bundle = make_bundle(root / "bundle", state=state)
    masks = {}
    for j in range(8):
        diagnosis = ("other_pneumonia", "covid")[j % 2]
        weights = write_case(root / "test" / f"t{j}", 5000 + j, diagnosis, 0.5)
        masks[f"1.2.826.0.1.3680043.10.997.{5000 + j}"] = (diagnosis, weights)
    summary = run_predict(bundle, root / "test", root / "out", device="cpu", progress=False)
    return summary, masks, root


def test_heat_map_hit_rate_on_planted_lesions(planted):
    summary, masks, root = planted
    near_mm = 15.0
    rows = []
    for result in summary.results:
        diagnosis, weights = masks[result.StudyInstanceUID]
        lesion = weights.transpose(2, 1, 0)  # phantom (slice, row, column) -> CT grid (column, row, slice)
        distance = ndimage.distance_transform_edt(~lesion, sampling=(PIXEL_MM, PIXEL_MM, SLICE_MM))
        stored = json.loads((root / "out" / result.study_key / PREDICTION_NAME).read_text())
        peak = tuple(stored["explanation"]["peak_voxel"])  # on the original CT grid
        hu, _ = read_hu_volume(as_series(result.series))
        lung = (hu < -700) | lesion  # chance: how often a random lung voxel lies this close to the lesion
        rows.append(
            (
                diagnosis,
                result.diagnosis == diagnosis,
                distance[peak] == 0,
                distance[peak] <= near_mm,
                float((distance[lung] <= near_mm).mean()),
                peak[2] in result.key_slices,
            )
        )
    correct = np.mean([r[1] for r in rows])
    inside = np.mean([r[2] for r in rows])
    near = np.mean([r[3] for r in rows])
    chance = np.mean([r[4] for r in rows])
    by_class = {d: np.mean([r[3] for r in rows if r[0] == d]) for d in ("other_pneumonia", "covid")}
    print(
        f"\n{summary.results[0].explanation['method']} peak on planted lesions ({len(rows)} studies, model accuracy {correct:.0%}): inside {inside:.0%}, "
        f"within {near_mm:g} mm {near:.0%} (consolidation {by_class['other_pneumonia']:.0%}, covid {by_class['covid']:.0%}); "
        f"a random lung voxel: {chance:.0%}"
    )
    # A model trained for seconds localises unevenly: over 10 training runs (other seeds; 20-40 held-out studies each)
    # Grad-CAM++'s peak was within 15 mm of the lesion in 33-85 % of studies, 55 % on average, inside it in 32 % (a
    # random lung voxel: 6 %). This fixed run, at block 4 (4 cells per axis): Grad-CAM inside 62 %, within 15 mm
    # 100 %; Grad-CAM++ 75 % and 100 %; at block 3 (8 cells, fedct's choice since MIN_CELLS = 5): Grad-CAM 50 % and
    # 62 % -- these planted lesions are large, the benchmark's randomised ones are not (README, "Explanations").
    # The bounds leave room for another machine's arithmetic.
    assert correct >= 0.75
    assert near >= 0.25 and near >= 3 * chance
    assert all(r[5] for r in rows)  # the peak's slice is a key slice (the strongest one)


def test_overlays_of_planted_cases_are_drawn(planted):
    summary, _, root = planted
    result = summary.results[0]
    assert result.key_slices[0] == result.explanation["peak_voxel"][2]
    # Each key slice passes through one recorded separate maximum; the legend names the method and the colours.
    assert [p["voxel"][2] for p in result.explanation["key_slice_peaks"]] == list(result.key_slices)
    assert result.explanation["method"] in result.explanation["legend"] and "red" in result.explanation["legend"]
    for path in result.overlays:
        with Image.open(path) as image:
            assert image.size[0] >= 300


def test_gradcampp_overflow_falls_back_to_gradcam():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn"))
    with torch.no_grad():
        model.diagnosis.bias += 500.0  # exp(logit) overflows float32: Grad-CAM++ weights become inf/NaN
    explainer = GradCamExplainer(model, model_name="smallcnn", input_size=(32, 32, 32), variant="Grad-CAM++")
    assert explainer.variant == "Grad-CAM++"
    cam = explainer(torch.rand(1, 1, 32, 32, 32), class_index=0)
    assert explainer.last_variant == "Grad-CAM" and bool(torch.isfinite(cam).all()) and float(cam.max()) > 0


def test_explanations_differentiate_one_view_of_a_model_with_test_time_flips():
    from inference.explain import LogitsOnly

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn", test_time_flips=(0,))).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        one = LogitsOnly(model)(x)
        assert torch.equal(one, model.forward_view(x).logits)
        assert not torch.allclose(one, model(x).logits)  # the prediction itself is the mean over both views
