"""A fast, randomised chest CT phantom in Hounsfield units, with diagnosis-dependent lung lesions.

Coordinates are physical (mm) in patient LPS axes: column index -> +x (patient left), row index ->
+y (posterior), slice index -> +z (superior). The in-plane origin is the image centre; z covers about
160 mm of chest, slice 0 being the most inferior (lung bases), so "lower lobe" means low z.

Everything is vectorised numpy; small structures (vessels, lesions, nodules) are painted only inside
their bounding boxes, so a 48x128x128 volume takes well under half a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Diagnostic classes, in the class-index order used everywhere in the project.
from preprocessing.labels import DIAGNOSES  # one class list for labels, model outputs and the generator

#: Length of chest (mm) that the phantom's anatomy is laid out over.
CHEST_LENGTH_MM = 160.0

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -862.0  # parenchyma baseline; with gradient, texture and vessels lungs average about -850
VESSEL_HU = 40.0
#: A voxel belongs to the lesion mask where the painted lesion's blending weight reaches this value.
LESION_MASK_WEIGHT = 0.5


@dataclass(frozen=True)
class PhantomStudy:
    """One rendered chest: the HU volume and where a lesion of the diagnosis was painted.

    ``hu`` is float32 (slices, rows, cols), slice 0 most inferior; ``lesion_mask`` is bool of the same
    shape, True where a lesion of the diagnosis (ground glass, consolidation) was painted with weight
    of at least :data:`LESION_MASK_WEIGHT`; all False for "normal" (distractors such as a dependent band,
    a nodule or a granuloma carry no label and are not marked).
    """

    hu: np.ndarray
    lesion_mask: np.ndarray


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
) -> None:
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ValueError(f"shape must be three positive integers (slices, rows, cols), got {shape!r}")
    if len(pixel_spacing_mm) != 2 or not all(math.isfinite(s) and s > 0 for s in pixel_spacing_mm):
        raise ValueError(f"pixel_spacing_mm must be two positive numbers (row, column), got {pixel_spacing_mm!r}")
    if not (math.isfinite(slice_spacing_mm) and slice_spacing_mm > 0):
        raise ValueError(f"slice_spacing_mm must be positive, got {slice_spacing_mm!r}")
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES}, got {diagnosis!r}")
    if not (math.isfinite(burden) and 0.0 <= burden <= 1.0):
        raise ValueError(f"burden must be in [0, 1], got {burden!r}")
    if not (math.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def chest_phantom(
    *,
    shape: tuple[int, int, int],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    diagnosis: str,
    burden: float,
    noise_hu: float,
    rng: np.random.Generator,
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
    ).hu


def render_chest(
    *,
    shape: tuple[int, int, int],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    diagnosis: str,
    burden: float,
    noise_hu: float,
    rng: np.random.Generator,
) -> PhantomStudy:
    """Random chest CT study: HU volume (slices, rows, cols), float32, slice 0 most inferior, and lesion mask.

    ``diagnosis`` selects the lesions (see module docs / DIAGNOSES); ``burden`` in [0, 1] is roughly
    the fraction of lung involved and is ignored for "normal". ``noise_hu`` is the std of the
    Gaussian noise added after a mild blur. ``pixel_spacing_mm`` is (row spacing, column spacing).
    """
    _validate(shape, pixel_spacing_mm, slice_spacing_mm, diagnosis, burden, noise_hu, rng)
    n_s, n_r, n_c = (int(n) for n in shape)
    dy, dx = (float(s) for s in pixel_spacing_mm)
    dz = float(slice_spacing_mm)
    z = ((np.arange(n_s) - (n_s - 1) / 2.0) * dz).astype(np.float32)
    y = ((np.arange(n_r) - (n_r - 1) / 2.0) * dy).astype(np.float32)
    x = ((np.arange(n_c) - (n_c - 1) / 2.0) * dx).astype(np.float32)
    coords = (z, y, x)
    voxel_mm = float(np.cbrt(dx * dy * dz))

    # --- patient-specific anatomy parameters -------------------------------------------------
    body_a = rng.uniform(125.0, 155.0)  # half width (x), mm
    body_b = rng.uniform(90.0, 118.0)  # half depth (y), mm
    cx, cy = rng.normal(0.0, 6.0, 2).clip(-15.0, 15.0)
    fat_mm = rng.uniform(6.0, 22.0)
    lung_scale = rng.uniform(0.88, 1.04)
    z_shift = rng.uniform(-10.0, 10.0)
    zz = (z - z_shift).astype(np.float32)
    t = np.clip((zz + CHEST_LENGTH_MM / 2.0) / CHEST_LENGTH_MM, 0.0, 1.0)  # 0 = base, 1 = apex

    body_scale = 0.92 + 0.08 * (1.0 - t)
    a_out = (body_a * body_scale).astype(np.float32)
    b_out = (body_b * body_scale).astype(np.float32)
    a_in = (a_out - fat_mm).astype(np.float32)
    b_in = (b_out - 0.8 * fat_mm).astype(np.float32)
    lung_knots = [0.55, 0.8, 1.0, 0.95, 0.72, 0.45]
    lung_profile = (np.interp(t, [0.0, 0.1, 0.3, 0.6, 0.85, 1.0], lung_knots) * lung_scale).astype(np.float32)
    heart_knots = [0.75, 1.0, 0.92, 0.55, 0.0, 0.0]
    heart_profile = np.interp(t, [0.0, 0.12, 0.45, 0.62, 0.72, 1.0], heart_knots).astype(np.float32)

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
    lung_ux, lung_vy = 0.45, 0.02
    rho = np.sqrt(((np.abs(u) - lung_ux) / (0.40 * lp)) ** 2 + ((v - lung_vy) / (0.80 * lp)) ** 2)
    lung = (rho <= 1.0) & (q <= 0.85) & (np.abs(u) >= 0.1)
    hp = heart_profile[:, None, None]
    heart = ((u - 0.12) / (0.34 * hp + 1e-6)) ** 2 + ((v + 0.28) / (0.42 * hp + 1e-6)) ** 2 <= 1.0
    lung &= ~heart
    spine_y = 0.6 * b_in  # per slice, mm posterior of body centre
    spine_r = rng.uniform(15.0, 19.0)
    vert = (X**2 + (Y - spine_y[:, None, None]) ** 2) <= (spine_r + 4.0) ** 2
    aorta = ((X - 0.2 * a_in[:, None, None]) ** 2 + (Y - spine_y[:, None, None] + 10.0) ** 2) <= 11.0**2
    lung &= ~(vert | aorta)
    parenchyma = LUNG_HU + 35.0 * v + 18.0 * texture  # gravity gradient: denser posteriorly
    vol = np.where(lung, parenchyma, vol).astype(np.float32)

    # --- heart, pericardial fat ---------------------------------------------------------------
    peri = ((u - 0.12) / (0.37 * hp + 1e-6)) ** 2 + ((v + 0.28) / (0.45 * hp + 1e-6)) ** 2 <= 1.0
    vol[peri & ~heart & ~lung & (q <= 1.0)] = -90.0
    vol[heart] = 42.0

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
    rib_z = np.broadcast_to((zz[:, None, None] - 22.0 * v - rib_phase) % rib_period, vol.shape)
    ribs = rib_ring & (rib_z < 9.0)
    vol[ribs] = np.where((rib_z[ribs] > 2.0) & (rib_z[ribs] < 7.0), 300.0, 650.0)
    sternum = ((u / 0.09) ** 2 + ((v + 0.93) / 0.05) ** 2 <= 1.0) & (t[:, None, None] > 0.2)
    vol[sternum] = 450.0

    # --- lesions ------------------------------------------------------------------------------
    consolidation = None
    lesion_w = np.zeros(vol.shape, dtype=np.float32)
    if diagnosis == "covid" and burden > 0:
        lesion_w = _add_covid(vol, rng, lung=lung, u=u, rho=rho, t=t, coords=coords, burden=burden, texture=texture)
    elif diagnosis == "other_pneumonia" and burden > 0:
        consolidation = _add_consolidation(
            vol, rng, lung=lung, u=u, coords=coords, zz=zz, burden=burden, texture=texture, voxel_mm=voxel_mm
        )
        if consolidation is not None:
            lesion_w = consolidation[0]

    # --- distractors seen in normal scans (all diagnoses, so they carry no label) -------------
    _add_distractors(vol, rng, lung=lung, v=v, t=t, coords=coords, voxel_mm=voxel_mm)

    # --- vessels: tapering branching tubes from each hilum ------------------------------------
    hilum_z = z_shift + (0.55 - 0.5) * CHEST_LENGTH_MM
    vessel_w = np.zeros_like(vol)
    points: list[tuple[float, float, float, float]] = []
    k_hilum = int(np.argmin(np.abs(t - 0.55)))
    for side in (-1.0, 1.0):
        hilum = np.array([hilum_z, cy + 0.02 * b_in[k_hilum], cx + side * 0.22 * a_in[k_hilum]])
        for _ in range(int(rng.integers(7, 10))):
            direction = np.array([rng.normal(0.0, 0.8), rng.normal(0.0, 0.6), side * rng.uniform(0.5, 1.0)])
            points += _branch_points(
                rng,
                hilum,
                direction,
                length_mm=rng.uniform(60.0, 95.0),
                radius_mm=rng.uniform(3.0, 4.5),
                step_mm=max(3.0, 0.8 * voxel_mm),
                depth=2,
            )
    _paint_tubes(vessel_w, points, coords, voxel_mm)
    vessel_w *= lung
    vol += vessel_w * (VESSEL_HU - vol)

    # --- air bronchograms inside consolidation ---------------------------------------------------
    if consolidation is not None and rng.random() < 0.65:
        cons_w, hilum_side = consolidation
        idx = np.flatnonzero(cons_w > 0.8)
        if idx.size:
            bronchi = np.zeros_like(vol)
            start = np.array([hilum_z, cy, cx + hilum_side * 0.22 * float(np.mean(a_in))])
            bpoints: list[tuple[float, float, float, float]] = []
            for target in rng.choice(idx, size=int(rng.integers(2, 5))):
                kz, ky, kx = np.unravel_index(target, vol.shape)
                end = np.array([z[kz], y[ky], x[kx]])
                n = 24
                for f in np.linspace(0.3, 1.0, n):
                    p = start + f * (end - start)
                    bpoints.append((p[0], p[1], p[2], 2.2 - 1.0 * f))
            _paint_tubes(bronchi, bpoints, coords, voxel_mm)
            bronchi *= np.clip(cons_w * 2.0 - 1.0, 0.0, 1.0)
            vol += bronchi * (-900.0 - vol)

    # --- acquisition: mild blur, noise ---------------------------------------------------------
    vol = ndimage.gaussian_filter(vol, sigma=(0.35, 0.6, 0.6), truncate=2.5)
    if noise_hu > 0:
        vol += rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(noise_hu)
    return PhantomStudy(hu=vol.astype(np.float32, copy=False), lesion_mask=lesion_w >= LESION_MASK_WEIGHT)


def _add_covid(
    vol: np.ndarray,
    rng: np.random.Generator,
    *,
    lung: np.ndarray,
    u: np.ndarray,
    rho: np.ndarray,
    t: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    burden: float,
    texture: np.ndarray,
) -> np.ndarray:
    """Bilateral, peripheral, lower-lobe-predominant ground-glass blobs with soft edges, in place.

    Returns the lesions' blending weight (max over blobs, before the per-blob opacity factor)."""
    z, y, x = coords
    peripheral = lung & ((rho >= 0.68) | (np.abs(u) >= 0.62))
    radius = 8.0 + 28.0 * math.sqrt(burden)
    lung_volume = (
        float(lung.sum())
        * float(abs(z[1] - z[0]) if z.size > 1 else 1.0)
        * float(abs(y[1] - y[0]) if y.size > 1 else 1.0)
        * float(abs(x[1] - x[0]) if x.size > 1 else 1.0)
    )
    per_blob = 0.3 * 4.0 / 3.0 * math.pi * radius**3  # a peripheral blob is roughly 30 % inside the lung
    n_blobs = int(np.clip(math.ceil(burden * lung_volume / per_blob), 2, 40))
    z_weight = (1.7 - 1.3 * t).astype(np.float64)  # lower lobes predominate
    weight = np.zeros(vol.shape, dtype=np.float32)
    for side_index, side_mask in enumerate((u < 0, u > 0)):
        n_side = n_blobs // 2 + (n_blobs % 2 if side_index == 0 else 0)
        cand = np.flatnonzero(peripheral & side_mask)
        if cand.size == 0 or n_side == 0:
            continue
        p = z_weight[np.unravel_index(cand, vol.shape)[0]]
        centres = rng.choice(cand, size=n_side, p=p / p.sum())
        for c in centres:
            kz, ky, kx = np.unravel_index(c, vol.shape)
            centre = (float(z[kz]), float(y[ky]), float(x[kx]))
            radii = tuple(radius * rng.uniform(0.65, 1.3) for _ in range(3))
            box = _bbox(centre, radii, coords)  # type: ignore[arg-type]
            if box is None:
                continue
            d = _ellipsoid_distance(centre, radii, coords, box)  # type: ignore[arg-type]
            shape_w = _soft_blob(d, edge=0.45) * lung[box]
            np.maximum(weight[box], shape_w, out=weight[box])
            w = shape_w * rng.uniform(0.75, 1.0)
            target = rng.uniform(-600.0, -300.0) + 30.0 * texture[box]
            vol[box] += w * (target - vol[box])
    return weight


def _add_consolidation(
    vol: np.ndarray,
    rng: np.random.Generator,
    *,
    lung: np.ndarray,
    u: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    zz: np.ndarray,
    burden: float,
    texture: np.ndarray,
    voxel_mm: float,
) -> tuple[np.ndarray, float] | None:
    """Lobar consolidation: the part of one lung (sometimes both) beyond a plane; returns (weight, side)."""
    z, y, x = coords
    main_side = -1.0 if rng.random() < 0.5 else 1.0  # -x: patient right
    bilateral = rng.random() < 0.2
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
    target = rng.uniform(-100.0, 40.0) + 15.0 * texture
    vol += weight * (target - vol)
    return weight, main_side


def _add_distractors(
    vol: np.ndarray,
    rng: np.random.Generator,
    *,
    lung: np.ndarray,
    v: np.ndarray,
    t: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    voxel_mm: float,
) -> None:
    """Findings common in normal scans: dependent posterior density, a small nodule, a calcified granuloma."""
    z, y, x = coords
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
    for probability, radius_range, hu_range in ((0.45, (2.5, 5.0), (-40.0, 70.0)), (0.15, (1.5, 2.5), (250.0, 500.0))):
        if rng.random() >= probability:
            continue
        cand = np.flatnonzero(lung)
        if cand.size == 0:
            continue
        kz, ky, kx = np.unravel_index(int(rng.choice(cand)), vol.shape)
        r = rng.uniform(*radius_range)
        w = np.zeros_like(vol)
        _paint_tubes(w, [(float(z[kz]), float(y[ky]), float(x[kx]), r)], coords, voxel_mm)
        vol += w * (rng.uniform(*hu_range) - vol)
