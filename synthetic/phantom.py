"""A fast chest CT phantom in Hounsfield units, with diagnosis-dependent lung lesions and domain randomisation.

Coordinates are physical (mm) in patient LPS axes: column index -> +x (patient left), row index ->
+y (posterior), slice index -> +z (superior). The in-plane origin is the image centre, slice 0 being the
most inferior, so "lower lobe" means low z.

With ``randomise=False`` (the canonical phantom) the lungs are laid out over the middle 160 mm of the scan
with one anatomy and one lung-density baseline. With ``randomise=True`` (the default, issue #20.1) each study
draws a :class:`StudyVariation`: where the lungs lie in the scan (so a long scan shows the apices, the neck
and the upper abdomen: liver, stomach with its gas bubble), the lungs' length, width and density (inspiration
level, gravity gradient), body habitus and centring, heart size and position, the vessel tree, contrast
phase, reconstruction kernel (blur and noise texture: correlated noise, smooth or sharp), noise level, slice
thickness, streaks and motion; and the lesions vary in count, size, density, shape and distribution. What a
study is labelled with is then the lesions, not the layout. Anatomy, acquisition and distractors are drawn
independently of the diagnosis, so one seed renders the same patient as normal or diseased.

Everything is vectorised numpy; small structures (vessels, lesions, nodules) are painted only inside
their bounding boxes, so a 48x128x128 volume takes well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from scipy import ndimage

#: Diagnostic classes, in the class-index order used everywhere in the project.
from preprocessing.labels import DIAGNOSES  # one class list for labels, model outputs and the generator

#: Length of chest (mm) that the canonical phantom's lungs are laid out over.
CHEST_LENGTH_MM = 160.0

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -862.0  # parenchyma baseline; with gradient, texture and vessels lungs average about -850
VESSEL_HU = 40.0
#: A voxel belongs to the lesion mask where the painted lesion's blending weight reaches this value.
LESION_MASK_WEIGHT = 0.5
#: Raised whenever the same seed and settings render different studies (cached benchmark data is then rewritten).
#: 2: randomised COVID-19 lesions filled up to their burden of the lung.
PHANTOM_VERSION = 2
#: Reconstruction kernels a randomised study is drawn with (blur and noise texture).
KERNELS = ("smooth", "standard", "sharp")
#: Ranges (inclusive) of the continuous draws of a randomised study (field of StudyVariation -> (low, high)).
VARIATION_RANGES = MappingProxyType(
    {
        "body_half_width_mm": (110.0, 175.0),
        "body_depth_ratio": (0.62, 0.86),
        "fat_mm": (3.0, 38.0),
        "centre_x_mm": (-30.0, 30.0),
        "centre_y_mm": (-25.0, 25.0),
        "lung_scale": (0.78, 1.08),
        "lung_length_mm": (135.0, 200.0),
        "lung_hu": (-890.0, -775.0),
        "lung_gradient_hu": (15.0, 60.0),
        "lung_texture_hu": (8.0, 30.0),
        "heart_scale": (0.8, 1.25),
        "heart_shift": (-0.04, 0.1),
        "vessels_per_hilum": (5, 12),
        "vessel_radius_scale": (0.7, 1.3),
        "blood_hu": (30.0, 300.0),
        "noise_scale": (0.6, 1.8),
        "slice_thickness_mm": (0.625, 7.0),
        "streak_hu": (0.0, 140.0),
        "motion_mm": (0.0, 8.0),
    }
)
#: COVID-like lesions of a randomised study (issue #20.1): the blob-size factor range, the two ranges a study's
#: ground-glass density interval is drawn from (HU: faint end, dense end), the least per-blob opacity and the fewest
#: blobs. Tuned so that the lesions are what a model can learn at the benchmark sizes (README "Benchmarks").
COVID_SIZE = (0.45, 1.35)
COVID_DENSITY_FAINT_HU = (-760.0, -520.0)
COVID_DENSITY_DENSE_HU = (-480.0, -250.0)
COVID_MIN_OPACITY = 0.6
COVID_MIN_BLOBS = 1
#: Randomised studies: blobs added beyond the volume-based count until the lesion mask covers ``burden`` of the lung
#: (overlap and the 40-blob cap left a mean burden of 0.27 at 8 % of the lung), at most this many.
COVID_MAX_FILL_BLOBS = 120
#: The canonical phantom's value of each randomised draw: a strength s < 1 pulls draws toward it.
CANONICAL_VALUES = MappingProxyType(
    {
        "body_half_width_mm": 140.0,
        "body_depth_ratio": 0.74,
        "fat_mm": 14.0,
        "centre_x_mm": 0.0,
        "centre_y_mm": 0.0,
        "lung_scale": 0.96,
        "lung_length_mm": CHEST_LENGTH_MM,
        "lung_hu": LUNG_HU,
        "lung_gradient_hu": 35.0,
        "lung_texture_hu": 18.0,
        "heart_scale": 1.0,
        "heart_shift": 0.0,
        "vessels_per_hilum": 8.0,
        "vessel_radius_scale": 1.0,
        "blood_hu": VESSEL_HU,
        "noise_scale": 1.0,
        "slice_thickness_mm": 5.0,
        "streak_hu": 0.0,
        "motion_mm": 0.0,
    }
)
#: Slice thicknesses a randomised study is reconstructed with (mm; those of clinical chest protocols).
SLICE_THICKNESSES_MM = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 7.0)


@dataclass(frozen=True)
class StudyVariation:
    """What one study was drawn with (anatomy, acquisition); the canonical phantom's values when not randomised.

    ``lung_base_mm`` is the z of the lungs' base relative to the scan's centre; ``blood_hu`` the HU of the heart,
    aorta and lung vessels (about 40 unenhanced, up to 300 in an arterial phase); ``slice_thickness_mm`` the
    reconstructed thickness (a blur along z; None: the slice spacing); ``streak_hu``/``motion_mm`` 0 when absent.
    """

    body_half_width_mm: float
    body_depth_ratio: float
    fat_mm: float
    centre_x_mm: float
    centre_y_mm: float
    lung_scale: float
    lung_length_mm: float
    lung_base_mm: float
    lung_hu: float
    lung_gradient_hu: float
    lung_texture_hu: float
    heart_scale: float
    heart_shift: float
    vessels_per_hilum: int
    vessel_radius_scale: float
    blood_hu: float
    kernel: str
    noise_scale: float
    slice_thickness_mm: float | None
    streak_hu: float
    motion_mm: float
    randomised: bool
    strength: float = 0.0  #: the randomisation strength it was drawn with (0: canonical)


@dataclass(frozen=True)
class PhantomStudy:
    """One rendered chest: the HU volume and where a lesion of the diagnosis was painted.

    ``hu`` is float32 (slices, rows, cols), slice 0 most inferior; ``lesion_mask`` is bool of the same
    shape, True where a lesion of the diagnosis (ground glass, consolidation) was painted with weight
    of at least :data:`LESION_MASK_WEIGHT`; all False for "normal" (distractors such as a dependent band,
    plate atelectasis, a nodule or a granuloma carry no label and are not marked). ``variation``: what the
    study was drawn with.
    """

    hu: np.ndarray
    lesion_mask: np.ndarray
    variation: StudyVariation | None = None


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float], cell_mm: float
) -> np.ndarray:
    """Smooth unit-variance random field with correlation length ``cell_mm`` (separable Gaussian interpolation)."""
    mats = []
    for n, step in zip(shape, spacing):
        length = n * step
        n_coarse = int(math.ceil(length / cell_mm)) + 3
        grid = (np.arange(n_coarse) - 1.0) * cell_mm
        pos = np.arange(n) * step
        w = np.exp(-(((pos[:, None] - grid[None, :]) / cell_mm) ** 2) * 2.0)
        w /= w.sum(axis=1, keepdims=True)
        mats.append(w.astype(np.float32))
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats), dtype=np.float32)
    field = coarse @ mats[2].T  # (a, b, C)
    field = np.matmul(mats[1], field)  # (a, R, C)
    a = field.shape[0]
    field = (mats[0] @ field.reshape(a, -1)).reshape(shape)  # (S, R, C)
    std = float(field.std())
    return field / (std if std > 0 else 1.0)


def _bbox(
    center: tuple[float, float, float],
    radii: tuple[float, float, float],
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[slice, slice, slice] | None:
    """Index ranges (z, y, x) of the voxels whose centres lie within ``radii`` of ``center``; None if empty."""
    out = []
    for c, r, axis in zip(center, radii, coords):
        step = float(axis[1] - axis[0]) if axis.size > 1 else 1.0
        lo = int(math.floor((c - r - axis[0]) / step))
        hi = int(math.ceil((c + r - axis[0]) / step)) + 1
        lo, hi = max(lo, 0), min(hi, axis.size)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return out[0], out[1], out[2]


def _ellipsoid_distance(
    center: tuple[float, float, float],
    radii: tuple[float, float, float],
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    box: tuple[slice, slice, slice],
) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) over the voxels of ``box``."""
    z, y, x = (axis[b] for axis, b in zip(coords, box))
    dz = ((z - center[0]) / radii[0])[:, None, None]
    dy = ((y - center[1]) / radii[1])[None, :, None]
    dx = ((x - center[2]) / radii[2])[None, None, :]
    return np.sqrt(dz * dz + dy * dy + dx * dx)


def _soft_blob(d: np.ndarray, *, edge: float) -> np.ndarray:
    """Weight 1 inside, smooth falloff to 0 over the outer ``edge`` fraction of the radius."""
    w = np.clip((1.0 - d) / edge, 0.0, 1.0)
    return w * w * (3.0 - 2.0 * w)


def _paint_tubes(
    weight: np.ndarray,
    points: list[tuple[float, float, float, float]],
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    voxel_mm: float,
) -> None:
    """Max-accumulate partial-volume weights of spheres (z, y, x, radius) into ``weight`` in place."""
    for cz, cy, cx, r in points:
        reach = r + voxel_mm
        box = _bbox((cz, cy, cx), (reach, reach, reach), coords)
        if box is None:
            continue
        d = _ellipsoid_distance((cz, cy, cx), (1.0, 1.0, 1.0), coords, box)
        w = np.clip((r - d) / voxel_mm + 0.5, 0.0, 1.0)
        np.maximum(weight[box], w, out=weight[box])


def _branch_points(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    *,
    length_mm: float,
    radius_mm: float,
    step_mm: float,
    depth: int,
) -> list[tuple[float, float, float, float]]:
    """Sphere centres along a randomly wandering, tapering, occasionally branching vessel."""
    points: list[tuple[float, float, float, float]] = []
    pos = start.astype(float).copy()
    d = direction / np.linalg.norm(direction)
    n_steps = max(1, int(length_mm / step_mm))
    for i in range(n_steps):
        r = radius_mm * (1.0 - 0.65 * i / n_steps)
        points.append((pos[0], pos[1], pos[2], r))
        d = d + rng.normal(0.0, 0.18, 3)
        d /= np.linalg.norm(d)
        pos = pos + d * step_mm
        if depth > 0 and i > 1 and rng.random() < 0.12:
            side = rng.normal(0.0, 1.0, 3)
            side -= side.dot(d) * d
            child = d + 0.9 * side / (np.linalg.norm(side) + 1e-9)
            points.extend(
                _branch_points(
                    rng,
                    pos,
                    child,
                    length_mm=(n_steps - i) * step_mm * 0.7,
                    radius_mm=r * 0.7,
                    step_mm=step_mm,
                    depth=depth - 1,
                )
            )
    return points


def _validate(
    shape: tuple[int, int, int],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    diagnosis: str,
    burden: float,
    noise_hu: float,
    rng: np.random.Generator,
    slice_thickness_mm: float | None,
) -> None:
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ValueError(f"shape must be three positive integers (slices, rows, cols), got {shape!r}")
    if len(pixel_spacing_mm) != 2 or not all(math.isfinite(s) and s > 0 for s in pixel_spacing_mm):
        raise ValueError(f"pixel_spacing_mm must be two positive numbers (row, column), got {pixel_spacing_mm!r}")
    if not (math.isfinite(slice_spacing_mm) and slice_spacing_mm > 0):
        raise ValueError(f"slice_spacing_mm must be positive, got {slice_spacing_mm!r}")
    if slice_thickness_mm is not None and not (math.isfinite(slice_thickness_mm) and slice_thickness_mm > 0):
        raise ValueError(f"slice_thickness_mm must be positive or None, got {slice_thickness_mm!r}")
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES}, got {diagnosis!r}")
    if not (math.isfinite(burden) and 0.0 <= burden <= 1.0):
        raise ValueError(f"burden must be in [0, 1], got {burden!r}")
    if not (math.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def randomisation_strength(randomise: bool | float) -> float:
    """``randomise`` as a strength in [0, 1] (False: 0, True: 1); ValueError naming a bad value."""
    if isinstance(randomise, bool):
        return float(randomise)
    if not isinstance(randomise, (int, float)) or not (math.isfinite(randomise) and 0.0 <= randomise <= 1.0):
        raise ValueError(f"randomise must be a bool or a strength in [0, 1], got {randomise!r}")
    return float(randomise)


def draw_variation(
    rng: np.random.Generator,
    *,
    scan_length_mm: float,
    randomise: bool | float,
    slice_thickness_mm: float | None = None,
) -> StudyVariation:
    """One study's anatomy and acquisition: random within :data:`VARIATION_RANGES` when ``randomise``, else the
    canonical phantom (its own small anatomical jitter only). ``slice_thickness_mm`` (None: drawn from
    :data:`SLICE_THICKNESSES_MM` when randomised, else the slice spacing) is kept as given.

    ``randomise`` may be a strength s in (0, 1]: every continuous draw is pulled toward the canonical value
    (:data:`CANONICAL_VALUES`; ``c + s * (draw - c)``) and every occasional feature (contrast phase, non-standard
    kernel, streaks, motion) happens s times as often, so s sets how much the nuisance varies (the difficulty);
    the lesions vary fully for any s > 0."""
    strength = randomisation_strength(randomise)
    if strength == 0.0:
        body_a = float(rng.uniform(125.0, 155.0))
        body_b = float(rng.uniform(90.0, 118.0))
        cx, cy = (float(c) for c in rng.normal(0.0, 6.0, 2).clip(-15.0, 15.0))
        return StudyVariation(
            body_half_width_mm=body_a,
            body_depth_ratio=body_b / body_a,
            fat_mm=float(rng.uniform(6.0, 22.0)),
            centre_x_mm=cx,
            centre_y_mm=cy,
            lung_scale=float(rng.uniform(0.88, 1.04)),
            lung_length_mm=CHEST_LENGTH_MM,
            lung_base_mm=-CHEST_LENGTH_MM / 2.0 + float(rng.uniform(-10.0, 10.0)),
            lung_hu=LUNG_HU,
            lung_gradient_hu=35.0,
            lung_texture_hu=18.0,
            heart_scale=1.0,
            heart_shift=0.0,
            vessels_per_hilum=8,
            vessel_radius_scale=1.0,
            blood_hu=VESSEL_HU,
            kernel="standard",
            noise_scale=1.0,
            slice_thickness_mm=slice_thickness_mm,
            streak_hu=0.0,
            motion_mm=0.0,
            randomised=False,
        )
    r = VARIATION_RANGES

    def toward(name: str, value: float) -> float:
        centre = CANONICAL_VALUES[name]
        return float(centre + strength * (value - centre))

    def u(name: str) -> float:
        lo, hi = r[name]
        return toward(name, float(rng.uniform(lo, hi)))

    body_a = u("body_half_width_mm")
    ratio = u("body_depth_ratio")
    fat = u("fat_mm")
    cx, cy = u("centre_x_mm"), u("centre_y_mm")
    lung_scale = u("lung_scale")
    length = u("lung_length_mm")
    # where the lungs lie in the scan: a long scan shows neck and upper abdomen, a short one cuts apex or base
    spare = scan_length_mm - length
    if spare >= 0:
        base = -scan_length_mm / 2.0 + float(rng.uniform(-0.08 * length, spare + 0.05 * length))
    else:
        base = -scan_length_mm / 2.0 + float(rng.uniform(spare - 0.05 * length, 0.05 * length))
    base = -length / 2.0 + strength * (base + length / 2.0)  # s < 1: nearer the scan's middle
    inspiration = float(rng.uniform(0.0, 1.0))  # 1 = deep inspiration: larger, darker lungs
    lung_hu = r["lung_hu"][1] - inspiration * (r["lung_hu"][1] - r["lung_hu"][0])
    lung_hu = toward("lung_hu", float(np.clip(lung_hu + rng.normal(0.0, 15.0), *r["lung_hu"])))
    gradient = u("lung_gradient_hu")
    texture = u("lung_texture_hu")
    heart_scale = u("heart_scale")
    heart_shift = u("heart_shift")
    vessels = round(
        toward("vessels_per_hilum", int(rng.integers(r["vessels_per_hilum"][0], r["vessels_per_hilum"][1] + 1)))
    )
    vessel_r = u("vessel_radius_scale")
    enhanced = rng.random() < 0.45 * strength
    blood = float(rng.uniform(140.0, r["blood_hu"][1])) if enhanced else float(rng.uniform(r["blood_hu"][0], 50.0))
    kernel = KERNELS[int(rng.choice(len(KERNELS), p=[0.3 * strength, 1.0 - 0.6 * strength, 0.3 * strength]))]
    noise_scale = u("noise_scale")
    thickness = slice_thickness_mm
    if thickness is None:
        thickness = float(SLICE_THICKNESSES_MM[int(rng.integers(len(SLICE_THICKNESSES_MM)))])
    streak = u("streak_hu") if rng.random() < 0.35 * strength else 0.0
    motion = u("motion_mm") if rng.random() < 0.3 * strength else 0.0
    return StudyVariation(
        body_half_width_mm=body_a,
        body_depth_ratio=ratio,
        fat_mm=fat,
        centre_x_mm=cx,
        centre_y_mm=cy,
        lung_scale=toward("lung_scale", float(np.clip(lung_scale * (0.94 + 0.1 * inspiration), *r["lung_scale"]))),
        lung_length_mm=toward(
            "lung_length_mm", float(np.clip(length * (0.95 + 0.08 * inspiration), *r["lung_length_mm"]))
        ),
        lung_base_mm=base,
        lung_hu=lung_hu,
        lung_gradient_hu=gradient,
        lung_texture_hu=texture,
        heart_scale=heart_scale,
        heart_shift=heart_shift,
        vessels_per_hilum=vessels,
        vessel_radius_scale=vessel_r,
        blood_hu=blood,
        kernel=kernel,
        noise_scale=noise_scale,
        slice_thickness_mm=thickness,
        streak_hu=streak,
        motion_mm=motion,
        randomised=True,
        strength=strength,
    )


def chest_phantom(
    *,
    shape: tuple[int, int, int],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    diagnosis: str,
    burden: float,
    noise_hu: float,
    rng: np.random.Generator,
    randomise: bool | float = True,
    slice_thickness_mm: float | None = None,
) -> np.ndarray:
    """Random chest CT volume (slices, rows, cols), float32 HU, slice 0 most inferior.

    Same as :func:`render_chest` but returns only the HU volume.
    """
    return render_chest(
        shape=shape,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_spacing_mm=slice_spacing_mm,
        diagnosis=diagnosis,
        burden=burden,
        noise_hu=noise_hu,
        rng=rng,
        randomise=randomise,
        slice_thickness_mm=slice_thickness_mm,
    ).hu


def _child(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator drawn from ``rng`` (so what it is used for does not shift later draws)."""
    return np.random.default_rng(int(rng.integers(0, 2**63 - 1)))


def render_chest(
    *,
    shape: tuple[int, int, int],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    diagnosis: str,
    burden: float,
    noise_hu: float,
    rng: np.random.Generator,
    randomise: bool | float = True,
    slice_thickness_mm: float | None = None,
) -> PhantomStudy:
    """Random chest CT study: HU volume (slices, rows, cols), float32, slice 0 most inferior, and lesion mask.

    ``diagnosis`` selects the lesions (see module docs / DIAGNOSES); ``burden`` in [0, 1] is roughly
    the fraction of lung involved and is ignored for "normal". ``noise_hu`` is the std of the noise
    (scaled per study when randomised: see :class:`StudyVariation`). ``pixel_spacing_mm`` is (row spacing,
    column spacing). ``randomise``: draw anatomy, acquisition and lesion pattern per study (module docs; a number
    in [0, 1] is the strength of the anatomy and acquisition draws, :func:`draw_variation`);
    ``slice_thickness_mm``: reconstructed slice thickness, a blur along z (None: drawn when randomised, else
    the spacing). The same ``rng`` state renders the same patient and acquisition whatever the diagnosis.
    """
    _validate(shape, pixel_spacing_mm, slice_spacing_mm, diagnosis, burden, noise_hu, rng, slice_thickness_mm)
    n_s, n_r, n_c = (int(n) for n in shape)
    dy, dx = (float(s) for s in pixel_spacing_mm)
    dz = float(slice_spacing_mm)
    z = ((np.arange(n_s) - (n_s - 1) / 2.0) * dz).astype(np.float32)
    y = ((np.arange(n_r) - (n_r - 1) / 2.0) * dy).astype(np.float32)
    x = ((np.arange(n_c) - (n_c - 1) / 2.0) * dx).astype(np.float32)
    coords = (z, y, x)
    voxel_mm = float(np.cbrt(dx * dy * dz))
    var = draw_variation(rng, scan_length_mm=n_s * dz, randomise=randomise, slice_thickness_mm=slice_thickness_mm)
    # independent streams, drawn in a fixed order whatever the diagnosis: same patient, same acquisition
    anatomy_rng, lesion_rng, distractor_rng, vessel_rng, acquisition_rng = (_child(rng) for _ in range(5))
    rng = anatomy_rng

    # --- patient-specific anatomy --------------------------------------------------------------
    body_a = var.body_half_width_mm
    body_b = var.body_depth_ratio * body_a
    cx, cy = var.centre_x_mm, var.centre_y_mm
    fat_mm = var.fat_mm
    length = var.lung_length_mm
    centre_z = var.lung_base_mm + length / 2.0
    zz = (z - np.float32(centre_z)).astype(np.float32)  # relative to the lungs' middle
    t_raw = ((z - np.float32(var.lung_base_mm)) / np.float32(length)).astype(np.float32)  # 0 = base, 1 = apex
    t = np.clip(t_raw, 0.0, 1.0)

    body_scale = 0.92 + 0.08 * (1.0 - t)
    a_out = (body_a * body_scale).astype(np.float32)
    b_out = (body_b * body_scale).astype(np.float32)
    if var.randomised:  # neck: the body narrows above the apices
        neck = np.clip((t_raw - 1.08) / 0.15, 0.0, 1.0).astype(np.float32)
        a_out = a_out * (1.0 - 0.45 * neck)
        b_out = b_out * (1.0 - 0.2 * neck)
    a_in = (a_out - fat_mm).astype(np.float32)
    b_in = (b_out - 0.8 * fat_mm).astype(np.float32)
    lung_t = [0.0, 0.1, 0.3, 0.6, 0.85, 1.0]
    lung_knots = [0.55, 0.8, 1.0, 0.95, 0.72, 0.45]
    if var.randomised:
        lung_profile = np.interp(t_raw, [*lung_t, 1.05], [*lung_knots, 0.0], left=0.0, right=0.0)
    else:
        lung_profile = np.interp(t, lung_t, lung_knots)
    lung_profile = (lung_profile * var.lung_scale).astype(np.float32)
    heart_t = [0.0, 0.12, 0.45, 0.62, 0.72, 1.0]
    heart_knots = [0.75, 1.0, 0.92, 0.55, 0.0, 0.0]
    if var.randomised:
        heart_profile = np.interp(t_raw, [-0.04, *heart_t], [0.0, *heart_knots], left=0.0, right=0.0)
    else:
        heart_profile = np.interp(t, heart_t, heart_knots)
    heart_profile = (heart_profile * var.heart_scale).astype(np.float32)

    X = x[None, None, :] - np.float32(cx)
    Y = y[None, :, None] - np.float32(cy)
    u = X / a_in[:, None, None]
    v = Y / b_in[:, None, None]
    q = np.sqrt(u * u + v * v)  # 1 on the inner chest wall

    # --- body: fat rim, soft tissue ----------------------------------------------------------
    outer = (X / a_out[:, None, None]) ** 2 + (Y / b_out[:, None, None]) ** 2 <= 1.0
    vol = np.full((n_s, n_r, n_c), AIR_HU, dtype=np.float32)
    vol[outer] = FAT_HU
    vol[q <= 1.0] = SOFT_TISSUE_HU

    # --- lungs ------------------------------------------------------------------------------
    texture = _smooth_noise(rng, (n_s, n_r, n_c), (dz, dy, dx), 7.0)
    lp = lung_profile[:, None, None]
    if var.randomised:
        lung_ux, lung_vy = float(rng.uniform(0.4, 0.5)), float(rng.uniform(-0.04, 0.06))
        half_w, half_d = float(rng.uniform(0.36, 0.44)), float(rng.uniform(0.72, 0.86))
    else:
        lung_ux, lung_vy, half_w, half_d = 0.45, 0.02, 0.40, 0.80
    rho = np.sqrt(((np.abs(u) - lung_ux) / (half_w * lp + 1e-6)) ** 2 + ((v - lung_vy) / (half_d * lp + 1e-6)) ** 2)
    lung = (rho <= 1.0) & (q <= 0.85) & (np.abs(u) >= 0.1) & (lp > 0)
    dome = None
    if var.randomised:  # diaphragm domes (the right one higher), deep posterior recesses
        dome_h = float(rng.uniform(0.05, 0.13))
        dome = dome_h * np.clip(1.0 - ((np.abs(u) - lung_ux) / 0.5) ** 2 - ((v + 0.15) / 1.0) ** 2, 0.0, 1.0)
        dome = dome + 0.025 * (u < 0)
        lung &= t_raw[:, None, None] >= dome
    hp = heart_profile[:, None, None]
    hx = 0.12 + var.heart_shift
    heart = ((u - hx) / (0.34 * hp + 1e-6)) ** 2 + ((v + 0.28) / (0.42 * hp + 1e-6)) ** 2 <= 1.0
    heart &= hp > 0
    lung &= ~heart
    spine_y = 0.6 * b_in  # per slice, mm posterior of body centre
    spine_r = rng.uniform(15.0, 19.0)
    vert = (X**2 + (Y - spine_y[:, None, None]) ** 2) <= (spine_r + 4.0) ** 2
    aorta = ((X - 0.2 * a_in[:, None, None]) ** 2 + (Y - spine_y[:, None, None] + 10.0) ** 2) <= 11.0**2
    lung &= ~(vert | aorta)
    trachea = None
    if var.randomised:
        trachea_r = float(rng.uniform(6.0, 10.0))
        trachea = ((X**2 + (Y + 0.2 * b_in[:, None, None]) ** 2) <= trachea_r**2) & (t_raw[:, None, None] > 0.62)
        lung &= ~trachea
    parenchyma = var.lung_hu + var.lung_gradient_hu * v + var.lung_texture_hu * texture  # denser posteriorly
    vol = np.where(lung, parenchyma, vol).astype(np.float32)

    # --- heart, pericardial fat, great vessels ---------------------------------------------------
    peri = ((u - hx) / (0.37 * hp + 1e-6)) ** 2 + ((v + 0.28) / (0.45 * hp + 1e-6)) ** 2 <= 1.0
    vol[peri & ~heart & ~lung & (q <= 1.0) & (hp > 0)] = -90.0
    vol[heart] = 42.0 if not var.randomised else var.blood_hu
    if var.randomised:
        vol[aorta & (q <= 1.0) & (t_raw[:, None, None] > -0.3) & (t_raw[:, None, None] < 1.0)] = var.blood_hu
        vol[trachea] = AIR_HU
        _add_abdomen(vol, rng, u=u, v=v, q=q, t=t_raw, dome=dome, lung=lung, blood_hu=var.blood_hu)

    # --- spine: vertebral body (cortical rim, cancellous core), canal, posterior elements, discs
    rr_spine = np.sqrt(X**2 + (Y - spine_y[:, None, None]) ** 2)
    disc_period = rng.uniform(24.0, 28.0)
    disc_phase = rng.uniform(0.0, disc_period)
    disc = (((zz - disc_phase) % disc_period) < 5.0)[:, None, None]
    vb = rr_spine <= spine_r
    vol[vb] = np.where(disc, 80.0, np.where(rr_spine >= spine_r - 3.0, 700.0, 380.0))[vb]
    canal_y = spine_y[:, None, None] + spine_r + 8.0
    rr_canal = np.sqrt(X**2 + (Y - canal_y) ** 2)
    vol[(rr_canal > 7.0) & (rr_canal <= 12.0) & ~disc] = 550.0
    vol[rr_canal <= 7.0] = 20.0
    spinous = (np.abs(X) <= 4.0) & (Y > canal_y + 10.0) & (Y < canal_y + 28.0) & (q <= 1.0)
    vol[spinous & ~disc] = 500.0

    # --- ribs (sloping arcs in the chest wall), sternum ---------------------------------------
    rib_period = rng.uniform(22.0, 28.0)
    rib_phase = rng.uniform(0.0, rib_period)
    rib_ring = (q >= 0.87) & (q <= 0.95) & ((v > -0.75) | (np.abs(u) > 0.35))
    if var.randomised:  # no ribs in the neck nor low in the abdomen
        rib_ring &= ((t_raw > -0.45) & (t_raw < 1.08))[:, None, None]
    rib_z = np.broadcast_to((zz[:, None, None] - 22.0 * v - rib_phase) % rib_period, vol.shape)
    ribs = rib_ring & (rib_z < 9.0)
    vol[ribs] = np.where((rib_z[ribs] > 2.0) & (rib_z[ribs] < 7.0), 300.0, 650.0)
    sternum = ((u / 0.09) ** 2 + ((v + 0.93) / 0.05) ** 2 <= 1.0) & (t[:, None, None] > 0.2)
    if var.randomised:
        sternum &= ((t_raw > 0.0) & (t_raw < 1.02))[:, None, None]
    vol[sternum] = 450.0

    # --- lesions ------------------------------------------------------------------------------
    consolidation = None
    lesion_w = np.zeros(vol.shape, dtype=np.float32)
    geometry = _Geometry(lung=lung, u=u, v=v, rho=rho, t=t, zz=zz, coords=coords, texture=texture, voxel_mm=voxel_mm)
    if diagnosis == "covid" and burden > 0:
        lesion_w = _add_covid(vol, lesion_rng, geometry, burden=burden, randomise=var.randomised)
    elif diagnosis == "other_pneumonia" and burden > 0:
        consolidation = _add_pneumonia(vol, lesion_rng, geometry, burden=burden, randomise=var.randomised)
        if consolidation is not None:
            lesion_w = consolidation[0]

    # --- distractors seen in normal scans (all diagnoses, so they carry no label) -------------
    _add_distractors(vol, distractor_rng, geometry, randomise=var.randomised)

    # --- vessels: tapering branching tubes from each hilum ------------------------------------
    rng = vessel_rng
    hilum_z = var.lung_base_mm + 0.55 * length
    vessel_w = np.zeros_like(vol)
    points: list[tuple[float, float, float, float]] = []
    k_hilum = int(np.argmin(np.abs(t_raw - 0.55)))
    per_hilum = var.vessels_per_hilum
    for side in (-1.0, 1.0):
        hilum = np.array([hilum_z, cy + 0.02 * b_in[k_hilum], cx + side * 0.22 * a_in[k_hilum]])
        for _ in range(int(rng.integers(per_hilum - 1, per_hilum + 2))):
            direction = np.array([rng.normal(0.0, 0.8), rng.normal(0.0, 0.6), side * rng.uniform(0.5, 1.0)])
            points += _branch_points(
                rng,
                hilum,
                direction,
                length_mm=rng.uniform(60.0, 95.0) * length / CHEST_LENGTH_MM,
                radius_mm=rng.uniform(3.0, 4.5) * var.vessel_radius_scale,
                step_mm=max(3.0, 0.8 * voxel_mm),
                depth=2,
            )
    _paint_tubes(vessel_w, points, coords, voxel_mm)
    vessel_w *= lung
    vol += vessel_w * (var.blood_hu - vol)

    # --- air bronchograms inside consolidation ---------------------------------------------------
    if consolidation is not None and consolidation[2] and lesion_rng.random() < 0.65:
        cons_w, hilum_side, _ = consolidation
        idx = np.flatnonzero(cons_w > 0.8)
        if idx.size:
            bronchi = np.zeros_like(vol)
            start = np.array([hilum_z, cy, cx + hilum_side * 0.22 * float(np.mean(a_in))])
            bpoints: list[tuple[float, float, float, float]] = []
            for target in lesion_rng.choice(idx, size=int(lesion_rng.integers(2, 5))):
                kz, ky, kx = np.unravel_index(target, vol.shape)
                end = np.array([z[kz], y[ky], x[kx]])
                n = 24
                for f in np.linspace(0.3, 1.0, n):
                    p = start + f * (end - start)
                    bpoints.append((p[0], p[1], p[2], 2.2 - 1.0 * f))
            _paint_tubes(bronchi, bpoints, coords, voxel_mm)
            bronchi *= np.clip(cons_w * 2.0 - 1.0, 0.0, 1.0)
            vol += bronchi * (-900.0 - vol)

    # --- acquisition: motion, streaks, kernel blur and slice thickness, noise texture -----------
    vol = _acquire(vol, acquisition_rng, var, outer=outer, spacing=(dz, dy, dx), noise_hu=noise_hu)
    return PhantomStudy(
        hu=vol.astype(np.float32, copy=False), lesion_mask=lesion_w >= LESION_MASK_WEIGHT, variation=var
    )


@dataclass(frozen=True)
class _Geometry:
    """The maps lesions and distractors are placed with (lung mask, normalised in-plane coordinates, heights)."""

    lung: np.ndarray
    u: np.ndarray
    v: np.ndarray
    rho: np.ndarray
    t: np.ndarray
    zz: np.ndarray
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    texture: np.ndarray
    voxel_mm: float


def _add_abdomen(
    vol: np.ndarray,
    rng: np.random.Generator,
    *,
    u: np.ndarray,
    v: np.ndarray,
    q: np.ndarray,
    t: np.ndarray,
    dome: np.ndarray | None,
    lung: np.ndarray,
    blood_hu: float,
) -> None:
    """Upper abdomen under the diaphragm, in place: liver (right), stomach with a gas bubble (left), bowel gas."""
    tt = t[:, None, None]
    below = (tt < (dome if dome is not None else 0.0)) & (q <= 0.97) & ~lung
    enhance = 0.3 * max(0.0, blood_hu - 40.0)
    liver_low = float(rng.uniform(-0.75, -0.45))
    liver = below & (u < 0.15 + 0.1 * v) & (tt > liver_low) & (v < 0.45)
    vol[liver] = float(rng.uniform(45.0, 70.0)) + enhance
    su, sv = float(rng.uniform(0.3, 0.45)), float(rng.uniform(-0.35, -0.1))
    stomach = below & (((u - su) / 0.28) ** 2 + ((v - sv) / 0.35) ** 2 <= 1.0) & (tt > liver_low + 0.1)
    vol[stomach] = float(rng.uniform(15.0, 40.0))
    if rng.random() < 0.65:  # gas collects anteriorly (non-dependent) at the top of the stomach
        gas_top = float(rng.uniform(-0.12, -0.02))
        vol[stomach & (v < sv - 0.05) & (tt > gas_top - 0.12)] = AIR_HU
    spleen = below & (((u - 0.55) / 0.18) ** 2 + ((v - 0.35) / 0.3) ** 2 <= 1.0) & (tt > liver_low + 0.15)
    vol[spleen] = float(rng.uniform(40.0, 55.0)) + enhance
    if rng.random() < 0.5:
        cand = np.flatnonzero(below & ~liver & ~stomach & (tt < -0.25) & (q <= 0.8))
        for c in rng.choice(cand, size=min(cand.size, int(rng.integers(1, 5))), replace=False) if cand.size else ():
            kz, ky, kx = np.unravel_index(int(c), vol.shape)
            vol[kz, max(0, ky - 1) : ky + 2, max(0, kx - 1) : kx + 2] = AIR_HU


def _acquire(
    vol: np.ndarray,
    rng: np.random.Generator,
    var: StudyVariation,
    *,
    outer: np.ndarray,
    spacing: tuple[float, float, float],
    noise_hu: float,
) -> np.ndarray:
    """Motion ghosting, beam-hardening streaks, kernel and slice-thickness blur and (correlated) noise."""
    dz, dy, dx = spacing
    n_s, n_r, n_c = vol.shape
    if var.motion_mm > 0 and n_s > 1:  # breathing / cardiac motion: a ghosted band of slices
        lo = int(rng.integers(0, n_s))
        hi = min(n_s, lo + max(1, int(rng.uniform(0.2, 0.6) * n_s)))
        shift = max(1, int(round(var.motion_mm / dy)))
        vol[lo:hi] = 0.65 * vol[lo:hi] + 0.35 * np.roll(vol[lo:hi], shift, axis=1)
    if var.streak_hu > 0:  # dark/bright lines through dense structures (shoulders, spine)
        yy = ((np.arange(n_r) - (n_r - 1) / 2.0) * dy)[:, None]
        xx = ((np.arange(n_c) - (n_c - 1) / 2.0) * dx)[None, :]
        streaks = np.zeros((n_r, n_c), dtype=np.float32)
        for _ in range(int(rng.integers(2, 7))):
            theta = rng.uniform(0.0, math.pi)
            px, py = rng.normal(0.0, 30.0, 2)
            dist = np.abs((xx - px) * math.sin(theta) - (yy - py) * math.cos(theta))
            amp = var.streak_hu * rng.uniform(-1.0, 0.4)
            streaks += (amp * np.exp(-0.5 * (dist / max(dx, 1.5)) ** 2)).astype(np.float32)
        lo = int(rng.integers(0, n_s))
        hi = min(n_s, lo + max(1, int(rng.uniform(0.15, 0.7) * n_s)))
        vol[lo:hi] += streaks[None] * outer[lo:hi]
    if var.randomised:
        blur_px = {"smooth": 1.0, "standard": 0.6, "sharp": 0.3}[var.kernel]
    else:
        blur_px = 0.6
    sigma_z = 0.35
    if var.slice_thickness_mm is not None:
        sigma_z = max(0.35, var.slice_thickness_mm / 2.355 / dz)
    vol = ndimage.gaussian_filter(vol, sigma=(sigma_z, blur_px, blur_px), truncate=2.5)
    level = noise_hu * var.noise_scale
    if level > 0:
        noise = rng.standard_normal(vol.shape, dtype=np.float32)
        if var.randomised:  # filtered-backprojection texture: correlated, smooth or sharp (high-pass)
            if var.kernel == "sharp":
                noise = noise - 0.85 * ndimage.gaussian_filter(noise, sigma=(0.0, 1.0, 1.0), truncate=2.5)
            else:
                width = 1.1 if var.kernel == "smooth" else 0.7
                noise = ndimage.gaussian_filter(noise, sigma=(0.0, width, width), truncate=2.5)
            noise /= max(float(noise.std()), 1e-6)
        vol += noise * np.float32(level)
    return vol


def _add_covid(
    vol: np.ndarray, rng: np.random.Generator, g: _Geometry, *, burden: float, randomise: bool
) -> np.ndarray:
    """Ground-glass blobs with soft edges, in place: bilateral, peripheral, lower-lobe predominant (always when not
    randomised; mostly, with varied count, size, density and distribution, when randomised).

    Returns the lesions' blending weight (max over blobs, before the per-blob opacity factor)."""
    z, y, x = g.coords
    lung, u, rho, t = g.lung, g.u, g.rho, g.t
    if randomise:
        peripheral_only = rng.random() < 0.8
        bilateral = rng.random() < 0.85
        z_pref = int(rng.choice(3, p=[0.65, 0.25, 0.1]))  # lower, none, upper
        size = float(rng.uniform(*COVID_SIZE))
        density = (float(rng.uniform(*COVID_DENSITY_FAINT_HU)), float(rng.uniform(*COVID_DENSITY_DENSE_HU)))
        consolidative = float(rng.uniform(0.0, 0.3))  # share of blobs that are denser (organising)
    else:
        peripheral_only, bilateral, z_pref, size = True, True, 0, 1.0
        density, consolidative = (-600.0, -300.0), 0.0
    peripheral = lung & ((rho >= 0.68) | (np.abs(u) >= 0.62)) if peripheral_only else lung
    radius = (8.0 + 28.0 * math.sqrt(burden)) * size
    lung_volume = (
        float(lung.sum())
        * float(abs(z[1] - z[0]) if z.size > 1 else 1.0)
        * float(abs(y[1] - y[0]) if y.size > 1 else 1.0)
        * float(abs(x[1] - x[0]) if x.size > 1 else 1.0)
    )
    inside = 0.3 if peripheral_only else 0.6  # share of a blob inside the lung
    per_blob = inside * 4.0 / 3.0 * math.pi * radius**3
    n_blobs = int(np.clip(math.ceil(burden * lung_volume / per_blob), COVID_MIN_BLOBS if randomise else 2, 40))
    z_weight = (np.ones_like(t), 1.7 - 1.3 * t, 0.4 + 1.3 * t)[(1, 0, 2)[z_pref]].astype(np.float64)
    weight = np.zeros(vol.shape, dtype=np.float32)
    covered = 0  # lung voxels under the lesion mask (weight >= LESION_MASK_WEIGHT) so far

    def blob(c: int) -> None:
        nonlocal covered
        kz, ky, kx = np.unravel_index(c, vol.shape)
        centre = (float(z[kz]), float(y[ky]), float(x[kx]))
        spread = (0.5, 1.5) if randomise else (0.65, 1.3)
        radii = tuple(radius * rng.uniform(*spread) for _ in range(3))
        box = _bbox(centre, radii, g.coords)  # type: ignore[arg-type]
        if box is None:
            return
        d = _ellipsoid_distance(centre, radii, g.coords, box)  # type: ignore[arg-type]
        shape_w = _soft_blob(d, edge=0.45) * lung[box]
        before = int(np.count_nonzero(weight[box] >= LESION_MASK_WEIGHT))
        np.maximum(weight[box], shape_w, out=weight[box])
        covered += int(np.count_nonzero(weight[box] >= LESION_MASK_WEIGHT)) - before
        w = shape_w * rng.uniform(COVID_MIN_OPACITY if randomise else 0.75, 1.0)
        hu = rng.uniform(-250.0, -60.0) if rng.random() < consolidative else rng.uniform(*density)
        target = hu + 30.0 * g.texture[box]
        vol[box] += w * (target - vol[box])

    masks = (u < 0, u > 0) if bilateral else ((u < 0) if rng.random() < 0.5 else (u > 0),)
    sides = []  # (candidate centres, their probabilities) per side
    for side_index, side_mask in enumerate(masks):
        n_side = n_blobs // len(masks) + (n_blobs % len(masks) if side_index == 0 else 0)
        cand = np.flatnonzero(peripheral & side_mask)
        if cand.size == 0:
            continue
        p = z_weight[np.unravel_index(cand, vol.shape)[0]]
        p = p / p.sum()
        sides.append((cand, p))
        for c in rng.choice(cand, size=n_side, p=p) if n_side else ():
            blob(int(c))
    if randomise and sides:
        # the volume-based count under-delivers (blobs overlap, at most 40): fill up to the burden, sides in turn
        wanted = burden * float(np.count_nonzero(lung))
        for extra in range(COVID_MAX_FILL_BLOBS):
            if covered >= wanted:
                break
            cand, p = sides[extra % len(sides)]
            blob(int(rng.choice(cand, p=p)))
    return weight


def _add_pneumonia(
    vol: np.ndarray, rng: np.random.Generator, g: _Geometry, *, burden: float, randomise: bool
) -> tuple[np.ndarray, float, bool] | None:
    """Other pneumonia, in place: lobar or segmental consolidation (always when not randomised) or, when randomised,
    sometimes bronchopneumonia (patchy dense clusters). Returns (weight, main side, lobar) or None if nothing fell
    in the lung."""
    if randomise and rng.random() < 0.4:
        return _add_bronchopneumonia(vol, rng, g, burden=burden)
    fraction_scale = float(rng.uniform(0.35, 1.2)) if randomise else 1.0  # segmental .. lobar
    result = _add_consolidation(vol, rng, g, burden=burden * fraction_scale, randomise=randomise)
    return None if result is None else (*result, True)


def _add_bronchopneumonia(
    vol: np.ndarray, rng: np.random.Generator, g: _Geometry, *, burden: float
) -> tuple[np.ndarray, float, bool] | None:
    """Patchy, often bilateral, dependent clusters of small dense nodular opacities; returns (weight, side, False)."""
    z, y, x = g.coords
    lung = g.lung
    main_side = -1.0 if rng.random() < 0.5 else 1.0
    sides = [main_side] + ([-main_side] if rng.random() < 0.55 else [])
    weight = np.zeros(vol.shape, dtype=np.float32)
    hu = float(rng.uniform(-320.0, 20.0))
    n_clusters = int(np.clip(round(3 + 14 * burden * rng.uniform(0.6, 1.4)), 2, 16))
    dependent = np.clip(g.v + 0.6, 0.05, None)  # posterior regions preferred
    for k in range(n_clusters):
        side = sides[k % len(sides)]
        cand = np.flatnonzero(lung & ((g.u < 0) if side < 0 else (g.u > 0)))
        if cand.size == 0:
            continue
        kz, ky, _ = np.unravel_index(cand, vol.shape)
        p = dependent[kz, ky, 0].astype(np.float64)
        centre_idx = np.unravel_index(int(rng.choice(cand, p=p / p.sum())), vol.shape)
        cz, cy, cx = float(z[centre_idx[0]]), float(y[centre_idx[1]]), float(x[centre_idx[2]])
        spread = float(rng.uniform(10.0, 28.0))
        for _ in range(int(rng.integers(3, 9))):
            centre = (cz + rng.normal(0, spread), cy + rng.normal(0, spread), cx + rng.normal(0, spread))
            r = float(rng.uniform(4.0, 11.0))
            radii = (r, r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3))
            box = _bbox(centre, radii, g.coords)
            if box is None:
                continue
            d = _ellipsoid_distance(centre, radii, g.coords, box)
            shape_w = _soft_blob(d, edge=0.5) * lung[box]
            np.maximum(weight[box], shape_w, out=weight[box])
    if not weight.any():
        return None
    target = hu + 20.0 * g.texture
    vol += weight * rng.uniform(0.75, 1.0) * (target - vol)
    return weight, main_side, False


def _add_consolidation(
    vol: np.ndarray, rng: np.random.Generator, g: _Geometry, *, burden: float, randomise: bool
) -> tuple[np.ndarray, float] | None:
    """Lobar consolidation: the part of one lung (sometimes both) beyond a plane; returns (weight, side)."""
    z, y, x = g.coords
    lung, u, zz = g.lung, g.u, g.zz
    main_side = -1.0 if rng.random() < 0.5 else 1.0  # -x: patient right
    bilateral = rng.random() < (0.3 if randomise else 0.2)
    fractions = {main_side: min(0.9, (1.5 if bilateral else 2.0) * burden * rng.uniform(0.8, 1.2))}
    if bilateral:
        fractions[-main_side] = min(0.9, 0.5 * burden * rng.uniform(0.8, 1.2))
    weight = np.zeros(vol.shape, dtype=np.float32)
    coarse = _smooth_noise(
        rng,
        vol.shape,
        (
            abs(float(z[1] - z[0])) if z.size > 1 else 1.0,
            abs(float(y[1] - y[0])) if y.size > 1 else 1.0,
            abs(float(x[1] - x[0])) if x.size > 1 else 1.0,
        ),
        18.0,
    )
    for side, fraction in fractions.items():
        idx = np.flatnonzero(lung & ((u < 0) if side < 0 else (u > 0)))
        if idx.size == 0 or fraction <= 0:
            continue
        lobes = ["lower", "upper", "middle"] if side < 0 else ["lower", "upper"]
        lobe = lobes[int(rng.choice(len(lobes), p=[0.55, 0.3, 0.15] if side < 0 else [0.65, 0.35]))]
        if lobe == "lower":
            normal = np.array([-1.0, rng.uniform(0.3, 0.8), 0.0])  # inferior and posterior
        elif lobe == "upper":
            normal = np.array([1.0, rng.uniform(-0.6, 0.0), 0.0])  # superior, a little anterior
        else:
            normal = np.array([-0.35, -1.0, 0.0])  # anterior, a little inferior (right middle lobe)
        normal[2] = rng.normal(0.0, 0.2) * side
        normal /= np.linalg.norm(normal)
        kz, ky, kx = np.unravel_index(idx, vol.shape)
        proj = normal[0] * zz[kz] + normal[1] * y[ky] + normal[2] * x[kx] + 6.0 * coarse.flat[idx]
        threshold = float(np.quantile(proj, 1.0 - fraction))
        w = 1.0 / (1.0 + np.exp(-(proj - threshold) / 2.5))
        weight.flat[idx] = np.maximum(weight.flat[idx], w.astype(np.float32))
    if not weight.any():
        return None
    low, high = (-350.0, 40.0) if randomise else (-100.0, 40.0)
    target = rng.uniform(low, high) + 15.0 * g.texture
    vol += weight * (target - vol)
    return weight, main_side


def _add_distractors(vol: np.ndarray, rng: np.random.Generator, g: _Geometry, *, randomise: bool) -> None:
    """Findings common in normal scans: dependent posterior density, a small nodule, a calcified granuloma; when
    randomised also plate atelectasis and a varied number of nodules."""
    z, y, x = g.coords
    lung, v, t = g.lung, g.v, g.t
    dy = abs(float(y[1] - y[0])) if y.size > 1 else 1.0
    if rng.random() < 0.55:
        k = max(1, int(round(rng.uniform(4.0, 10.0) / dy)))
        behind = np.zeros_like(lung)
        behind[:, :-k, :] = lung[:, k:, :]
        band = lung & ~behind & (v > 0.2)
        strength = rng.uniform(0.5, 0.9) * np.interp(t, [0.0, 1.0], [1.0, 0.35])[:, None, None]
        target = rng.uniform(-500.0, -200.0)
        w = band * strength
        vol += w * (target - vol)
    nodules = [((2.5, 5.0), (-40.0, 70.0))] * (int(rng.poisson(0.9)) if randomise else int(rng.random() < 0.45))
    granulomas = [((1.5, 2.5), (250.0, 500.0))] * int(rng.random() < (0.25 if randomise else 0.15))
    for radius_range, hu_range in nodules + granulomas:
        cand = np.flatnonzero(lung)
        if cand.size == 0:
            continue
        kz, ky, kx = np.unravel_index(int(rng.choice(cand)), vol.shape)
        r = rng.uniform(*radius_range)
        w = np.zeros_like(vol)
        _paint_tubes(w, [(float(z[kz]), float(y[ky]), float(x[kx]), r)], g.coords, g.voxel_mm)
        vol += w * (rng.uniform(*hu_range) - vol)
    if randomise and rng.random() < 0.3:  # plate atelectasis: a thin, roughly horizontal band low in one lung
        cand = np.flatnonzero(lung & (t[:, None, None] < 0.45))
        if cand.size:
            kz, ky, kx = np.unravel_index(int(rng.choice(cand)), vol.shape)
            thick = float(rng.uniform(1.5, 4.0))
            tilt = float(rng.normal(0.0, 0.15))
            plane = np.abs(z[:, None, None] - z[kz] - tilt * (y[None, :, None] - y[ky]))
            near = np.abs(x[None, None, :] - x[kx]) < rng.uniform(20.0, 50.0)
            w = lung * near * np.clip(1.0 - plane / thick, 0.0, 1.0)
            vol += w * (rng.uniform(-400.0, -100.0) - vol)
