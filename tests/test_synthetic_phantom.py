"""synthetic.phantom: anatomy and lesion HU ranges of the canonical phantom, domain randomisation (ranges, variety,
same patient whatever the diagnosis), determinism, argument checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage

from synthetic.phantom import (
    CANONICAL_VALUES,
    DIAGNOSES,
    KERNELS,
    SLICE_THICKNESSES_MM,
    VARIATION_RANGES,
    PhantomStudy,
    StudyVariation,
    chest_phantom,
    draw_variation,
    render_chest,
)

# 64 x 64 pixels of 5.5 mm and 40 slices of 4 mm cover a whole 350 mm x 160 mm chest, cheaply. The anatomy tests
# use the canonical phantom (randomise=False); the randomised one has its own tests below.
SMALL = dict(shape=(40, 64, 64), pixel_spacing_mm=(5.5, 5.5), slice_spacing_mm=4.0, randomise=False)
# 64 x 64 pixels of 6 mm and 30 slices of 10 mm: a 300 mm scan, randomised.
LONG = dict(shape=(30, 64, 64), pixel_spacing_mm=(6.0, 6.0), slice_spacing_mm=10.0)


def _phantom(diagnosis: str, burden: float, seed: int, noise_hu: float = 0.0) -> np.ndarray:
    return chest_phantom(
        diagnosis=diagnosis, burden=burden, noise_hu=noise_hu, rng=np.random.default_rng(seed), **SMALL
    )  # type: ignore[arg-type]


def _study(diagnosis: str, seed: int, burden: float = 0.35, noise_hu: float = 0.0) -> PhantomStudy:
    return render_chest(diagnosis=diagnosis, burden=burden, noise_hu=noise_hu, rng=np.random.default_rng(seed), **LONG)  # type: ignore[arg-type]


def _lung_mask(normal: np.ndarray) -> np.ndarray:
    """Lung voxels of a noise-free normal phantom (its anatomy depends only on the seed, not the diagnosis)."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    body = np.stack([ndimage.binary_fill_holes(s) for s in normal > -300.0])
    interior = ndimage.binary_erosion(body, structure=in_plane, iterations=2)  # drop the blurred skin edge
    return interior & (normal > -950.0) & (normal < -650.0)


def test_diagnoses_order() -> None:
    assert DIAGNOSES == ("covid", "other_pneumonia", "normal")


def test_shape_dtype_and_anatomy_ranges() -> None:
    vol = _phantom("normal", 0.0, seed=1)
    assert vol.shape == (40, 64, 64) and vol.dtype == np.float32
    assert np.all(np.isfinite(vol))
    corners = vol[:, :3, :3]
    np.testing.assert_allclose(corners, -1000.0, atol=1.0)  # air outside the body
    lung = _lung_mask(vol)
    assert 0.05 < lung.mean() < 0.3
    assert -880.0 < float(np.median(vol[lung])) < -800.0  # lungs near -850 HU
    centre = vol[:, 26:38, 26:38]
    assert np.any(np.abs(centre - 40.0) < 15.0)  # heart / mediastinum soft tissue
    assert float(vol.max()) > 450.0  # spine and ribs
    assert np.any((vol > -130.0) & (vol < -70.0))  # subcutaneous fat
    # the spine is posterior (high row index): midline bone lies mostly in the posterior half
    midline_bone = (vol > 300.0)[:, :, 28:36]
    assert midline_bone[:, 32:].sum() > 5 * midline_bone[:, :32].sum()
    # the heart is anterior and slightly to the patient's left (+x, high column index)
    soft = (np.abs(vol - 42.0) < 10.0)[:, 12:32, 16:48]
    assert soft[:, :, 16:].sum() > soft[:, :, :16].sum()


def test_noise_level() -> None:
    vol = _phantom("normal", 0.0, seed=2, noise_hu=20.0)
    air = vol[:, :4, :4]
    assert float(air.std()) == pytest.approx(20.0, rel=0.15)
    assert float(air.mean()) == pytest.approx(-1000.0, abs=2.0)


def test_deterministic_for_a_seed() -> None:
    a = _phantom("covid", 0.3, seed=5, noise_hu=10.0)
    b = _phantom("covid", 0.3, seed=5, noise_hu=10.0)
    c = _phantom("covid", 0.3, seed=6, noise_hu=10.0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diseased_lungs_are_denser_than_normal(seed: int) -> None:
    normal = _phantom("normal", 0.0, seed)
    lung = _lung_mask(normal)
    covid = _phantom("covid", 0.5, seed)
    pneumonia = _phantom("other_pneumonia", 0.5, seed)
    assert covid[lung].mean() > normal[lung].mean() + 40.0
    assert pneumonia[lung].mean() > normal[lung].mean() + 150.0


def test_covid_is_bilateral_peripheral_ground_glass_with_lower_predominance() -> None:
    lower, upper, left, right, dense = 0.0, 0.0, 0, 0, 0
    for seed in range(4):
        normal = _phantom("normal", 0.0, seed)
        lung = _lung_mask(normal)
        covid = _phantom("covid", 0.4, seed)
        ggo = lung & (covid > -650.0) & (covid < -250.0) & (covid - normal > 150.0)
        lower += ggo[:20].sum() / max(1, lung[:20].sum())
        upper += ggo[20:].sum() / max(1, lung[20:].sum())
        right += int(ggo[:, :, :32].sum())
        left += int(ggo[:, :, 32:].sum())
        dense += int((lung & (covid > -150.0) & (covid - normal > 300.0)).sum())
    assert lower > 1.3 * upper
    assert min(left, right) > 0.25 * max(left, right)  # both lungs involved
    assert dense < 0.05 * (left + right)  # ground glass, not consolidation


def test_other_pneumonia_is_mostly_unilateral_consolidation() -> None:
    unilateral = 0
    for seed in range(5):
        normal = _phantom("normal", 0.0, seed)
        lung = _lung_mask(normal)
        pneumonia = _phantom("other_pneumonia", 0.4, seed)
        cons = lung & (pneumonia > -150.0)
        assert cons.sum() > 0.15 * lung.sum()
        assert -130.0 < float(pneumonia[cons].mean()) < 70.0
        sides = sorted([cons[:, :, :32].sum() / lung[:, :, :32].sum(), cons[:, :, 32:].sum() / lung[:, :, 32:].sum()])
        unilateral += int(sides[0] < 0.05)
    assert unilateral >= 3


def test_normal_has_no_large_lesions_and_ignores_burden() -> None:
    for seed in range(3):
        normal = _phantom("normal", 0.0, seed)
        assert np.array_equal(normal, _phantom("normal", 0.7, seed))  # burden is ignored for normal scans
        lung = _lung_mask(normal)
        region = np.stack([ndimage.binary_fill_holes(s) for s in lung])  # lungs including what lies inside
        covid = _phantom("covid", 0.5, seed)
        # dense lung voxels are rare in normal scans (vessels, a thin dependent band, maybe a nodule)
        assert (normal[region] > -500.0).mean() < 0.03
        assert (covid[region] > -700.0).mean() > 0.25
        assert -870.0 < float(np.median(normal[lung])) < -830.0


def test_same_seed_same_volume_in_float32() -> None:
    """Reproducible per seed and float32 (no float64 volume); its speed is a benchmark figure
    (``fedct bench preprocess`` writes the phantom series), not a timed test."""
    kwargs = dict(shape=(24, 64, 64), pixel_spacing_mm=(5.6, 5.6), slice_spacing_mm=160 / 24, noise_hu=15.0)
    first = chest_phantom(diagnosis="covid", burden=0.5, rng=np.random.default_rng(3), **kwargs)  # type: ignore[arg-type]
    again = chest_phantom(diagnosis="covid", burden=0.5, rng=np.random.default_rng(3), **kwargs)  # type: ignore[arg-type]
    other = chest_phantom(diagnosis="covid", burden=0.5, rng=np.random.default_rng(4), **kwargs)  # type: ignore[arg-type]
    assert first.shape == (24, 64, 64)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"diagnosis": "flu"}, "'flu'"),
        ({"burden": 1.5}, "1.5"),
        ({"burden": -0.1}, "-0.1"),
        ({"pixel_spacing_mm": (0.0, 2.0)}, "(0.0, 2.0)"),
        ({"slice_spacing_mm": -2.0}, "-2.0"),
        ({"noise_hu": -1.0}, "-1.0"),
        ({"shape": (0, 8, 8)}, "(0, 8, 8)"),
        ({"slice_thickness_mm": 0.0}, "0.0"),
    ],
)
def test_bad_arguments(overrides: dict[str, object], named: str) -> None:
    kwargs: dict[str, object] = dict(
        shape=(4, 8, 8),
        pixel_spacing_mm=(2.0, 2.0),
        slice_spacing_mm=2.0,
        diagnosis="normal",
        burden=0.0,
        noise_hu=0.0,
        rng=np.random.default_rng(0),
    )
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=re.escape(named)):
        chest_phantom(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("diagnosis", ["covid", "other_pneumonia"])
def test_lesion_mask_marks_the_painted_lesions(diagnosis: str) -> None:
    """render_chest's mask is where the diseased render differs strongly from the normal render of the same seed."""
    for seed in range(3):
        study = render_chest(diagnosis=diagnosis, burden=0.4, noise_hu=0.0, rng=np.random.default_rng(seed), **SMALL)
        normal = render_chest(diagnosis="normal", burden=0.0, noise_hu=0.0, rng=np.random.default_rng(seed), **SMALL)
        assert isinstance(study, PhantomStudy)
        assert study.lesion_mask.dtype == np.bool_ and study.lesion_mask.shape == study.hu.shape
        assert not normal.lesion_mask.any()
        np.testing.assert_array_equal(
            normal.hu,
            chest_phantom(diagnosis="normal", burden=0.0, noise_hu=0.0, rng=np.random.default_rng(seed), **SMALL),
        )
        mask = study.lesion_mask
        assert 0.01 < mask.mean() < 0.3
        diff = study.hu - normal.hu
        lung = _lung_mask(normal.hu)
        assert float(np.median(diff[mask])) > 150.0
        assert float(np.median(np.abs(diff[lung & ~mask]))) < 0.25 * float(np.median(diff[mask]))


# --- domain randomisation (issue #20.1) ----------------------------------------------------------------------------


def test_variation_draws_stay_within_their_ranges_and_use_them() -> None:
    """Every continuous draw lies in VARIATION_RANGES and spreads over most of it; kernels, thicknesses, both
    contrast phases, artefacts present and absent, and lungs placed so that some scans show the upper abdomen and
    some the neck."""
    rng = np.random.default_rng(0)
    scan = 300.0
    drawn = [draw_variation(rng, scan_length_mm=scan, randomise=True) for _ in range(600)]
    assert all(isinstance(v, StudyVariation) and v.randomised for v in drawn)
    for name, (low, high) in VARIATION_RANGES.items():
        values = np.array([getattr(v, name) for v in drawn], dtype=float)
        assert values.min() >= low - 1e-9 and values.max() <= high + 1e-9, name
        if name not in ("streak_hu", "motion_mm"):
            assert values.max() - values.min() > 0.5 * (high - low), name
    assert {v.kernel for v in drawn} == set(KERNELS)
    assert {v.slice_thickness_mm for v in drawn} == set(SLICE_THICKNESSES_MM)
    blood = np.array([v.blood_hu for v in drawn])
    assert 0.3 < (blood > 140.0).mean() < 0.6 and (blood < 50.0).mean() > 0.4  # enhanced or not
    for name in ("streak_hu", "motion_mm"):
        present = np.array([getattr(v, name) > 0 for v in drawn])
        assert 0.15 < present.mean() < 0.5, name
    base = np.array([v.lung_base_mm for v in drawn])
    apex = base + np.array([v.lung_length_mm for v in drawn])
    assert (base > -scan / 2 + 40.0).mean() > 0.2  # upper abdomen in view
    assert (apex < scan / 2 - 40.0).mean() > 0.2  # neck in view
    assert (base < -scan / 2).mean() > 0.02 and (apex > scan / 2).mean() > 0.02  # a base or apex cut off
    canonical = draw_variation(rng, scan_length_mm=scan, randomise=False, slice_thickness_mm=2.0)
    assert not canonical.randomised and canonical.kernel == "standard" and canonical.slice_thickness_mm == 2.0
    assert canonical.lung_length_mm == 160.0 and canonical.streak_hu == 0.0 and canonical.motion_mm == 0.0


def test_a_randomisation_strength_pulls_draws_toward_the_canonical_study() -> None:
    """Strength s: every continuous draw within s of its range around the canonical value, occasional features
    (contrast, non-standard kernel, streaks, motion) about s times as often; s = 1 is True; the lesions keep varying."""
    scan = 300.0

    def spread(s: float, name: str) -> float:
        rng = np.random.default_rng(3)
        values = [getattr(draw_variation(rng, scan_length_mm=scan, randomise=s), name) for _ in range(400)]
        return float(np.ptp(values))

    for name in ("body_half_width_mm", "lung_hu", "fat_mm", "noise_scale", "heart_scale"):
        full = spread(1.0, name)
        assert spread(0.3, name) == pytest.approx(0.3 * full, rel=0.25), name
    rng = np.random.default_rng(4)
    weak = [draw_variation(rng, scan_length_mm=scan, randomise=0.25) for _ in range(800)]
    assert all(v.randomised and v.strength == 0.25 for v in weak)
    assert 0.05 < np.mean([v.blood_hu > 140.0 for v in weak]) < 0.2  # 0.45 x 0.25
    assert 0.08 < np.mean([v.kernel != "standard" for v in weak]) < 0.25  # 0.6 x 0.25
    for name, value in CANONICAL_VALUES.items():
        if name in VARIATION_RANGES and name not in ("slice_thickness_mm", "blood_hu", "streak_hu", "motion_mm"):
            low, high = VARIATION_RANGES[name]
            values = [float(getattr(v, name)) for v in weak]
            assert (
                value - 0.25 * (value - low) - 1.0 <= min(values) and max(values) <= value + 0.25 * (high - value) + 1.0
            )
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    assert draw_variation(rng_a, scan_length_mm=scan, randomise=1.0) == draw_variation(
        rng_b, scan_length_mm=scan, randomise=True
    )


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "yes"])
def test_a_bad_randomisation_strength_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="randomise must be a bool or a strength"):
        draw_variation(np.random.default_rng(0), scan_length_mm=200.0, randomise=bad)  # type: ignore[arg-type]


def test_randomised_studies_are_deterministic_per_seed_and_differ_between_seeds() -> None:
    a, b, c = _study("covid", 5, noise_hu=12.0), _study("covid", 5, noise_hu=12.0), _study("covid", 6, noise_hu=12.0)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert a.variation == b.variation != c.variation
    assert not np.array_equal(a.hu, c.hu)
    assert a.hu.dtype == np.float32 and a.hu.shape == (30, 64, 64) and np.all(np.isfinite(a.hu))


def test_one_seed_renders_the_same_patient_whatever_the_diagnosis() -> None:
    """Anatomy, acquisition (noise included) and distractors do not depend on the diagnosis: away from the lesions a
    diseased study equals the normal one of the same seed, so the lesions are what tells them apart."""
    for seed in range(4):
        normal = _study("normal", seed, noise_hu=15.0)
        assert not normal.lesion_mask.any()
        for diagnosis in ("covid", "other_pneumonia"):
            ill = _study(diagnosis, seed, noise_hu=15.0)
            assert ill.variation == normal.variation
            changed = np.abs(ill.hu - normal.hu) > 1.0
            far = ~ndimage.binary_dilation(ill.lesion_mask, iterations=6)
            assert (changed & far).mean() < 0.02, (seed, diagnosis)
            assert changed[ill.lesion_mask].mean() > 0.5, (seed, diagnosis)


def test_masks_present_iff_the_diagnosis_has_lesions_and_mark_denser_lung() -> None:
    """Randomised lesions of every pattern are marked (and only they): the mask is empty for normal, present for
    COVID-19 and other pneumonia, and where it is the lung is denser than in the same patient without them."""
    for seed in range(10):
        normal = _study("normal", seed)
        assert not normal.lesion_mask.any()
        assert not _study("normal", seed, burden=0.8).lesion_mask.any()
        for diagnosis in ("covid", "other_pneumonia"):
            study = _study(diagnosis, seed, burden=float(np.random.default_rng(seed).uniform(0.08, 0.6)))
            mask = study.lesion_mask
            assert mask.any(), (seed, diagnosis)
            assert float(np.median((study.hu - normal.hu)[mask])) > 30.0, (seed, diagnosis)


def test_randomised_lesions_vary_in_density_extent_and_distribution() -> None:
    """COVID-19 lesions range from faint ground glass to denser patches, mostly bilateral; other pneumonia ranges
    from one consolidated region to many small clusters."""
    covid_hu, bilateral, pneumonia_parts = [], 0, []
    for seed in range(16):
        normal = _study("normal", seed)
        covid = _study("covid", seed)
        covid_hu.append(float(np.median(covid.hu[covid.lesion_mask])))
        cols = covid.lesion_mask.any(axis=(0, 1))
        bilateral += int(cols[:32].any() and cols[32:].any())
        pneumonia = _study("other_pneumonia", seed)
        pneumonia_parts.append(ndimage.label(pneumonia.lesion_mask)[1])
        assert not np.array_equal(normal.hu, pneumonia.hu)
    assert max(covid_hu) - min(covid_hu) > 150.0
    assert min(covid_hu) < -500.0  # faint ground glass
    assert bilateral >= 10
    assert min(pneumonia_parts) <= 2 and max(pneumonia_parts) >= 5


def test_long_scans_show_the_upper_abdomen_below_the_lungs() -> None:
    """Where a scan reaches below the lungs, its lowest slices hold soft tissue (liver) and no lung; where it
    reaches above them, its highest slices hold no lung but the air of the trachea."""
    below = above = 0
    for seed in range(12):
        study = _study("normal", seed)
        v = study.variation
        assert v is not None
        hu = study.hu
        in_plane = np.zeros((3, 3, 3), dtype=bool)
        in_plane[1] = ndimage.generate_binary_structure(2, 1)
        body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -300.0])
        interior = ndimage.binary_erosion(body, structure=in_plane, iterations=2)  # not the blurred skin edge
        lung_share = (interior & (hu > -950.0) & (hu < -650.0)).mean(axis=(1, 2))
        if v.lung_base_mm > -150.0 + 40.0:  # lowest slice at least 40 mm below the lungs
            below += 1
            assert lung_share[0] < 0.01
            assert ((hu[0] > 30.0) & (hu[0] < 120.0)).mean() > 0.1  # liver, spleen, soft tissue
        if v.lung_base_mm + v.lung_length_mm < 150.0 - 40.0:
            above += 1
            assert lung_share[-1] < 0.01
            assert (hu[-1] < -900.0)[20:44, 20:44].any()  # trachea
    assert below and above


def test_randomised_covid_lesions_cover_about_the_burden_of_the_lung(monkeypatch) -> None:
    """``burden`` is the fraction of lung involved: on randomised studies the lesion mask covers about that share of
    the phantom's lung (before, overlapping blobs and the 40-blob cap left a burden of 0.27 at about 8 %)."""
    import synthetic.phantom as phantom

    shares: list[tuple[float, float]] = []
    add_covid = phantom._add_covid

    def recording(vol, rng, g, *, burden, randomise):
        weight = add_covid(vol, rng, g, burden=burden, randomise=randomise)
        shares.append((burden, float((weight >= phantom.LESION_MASK_WEIGHT)[g.lung].mean())))
        return weight

    monkeypatch.setattr(phantom, "_add_covid", recording)
    for seed in range(3):
        for burden in (0.1, 0.3, 0.5):
            render_chest(**LONG, diagnosis="covid", burden=burden, noise_hu=0.0, rng=np.random.default_rng(seed))
    assert len(shares) == 9
    for burden, share in shares:
        assert 0.8 * burden <= share <= burden + 0.15, (burden, share)
