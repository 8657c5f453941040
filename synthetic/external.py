"""External validation family: chest CT studies from a second generator, written independently of ``synthetic.phantom``.

A model trained on one generator's studies can learn that generator's signature instead of the finding. This family
is for validation only (never a training site): it shares no anatomy or lesion code with :mod:`synthetic.phantom`
and is built another way throughout, so a model that scores well here learned something that transfers.

- **Anatomy**: a superellipse torso with a fat layer and a CT table under it, lungs as perturbed elliptic cylinders
  cut by diaphragm domes (liver below the right dome, stomach gas below the left), mediastinal fat, heart, aorta,
  vertebra with canal, rib arcs, sternum, breasts for some women, trachea and main bronchi; pulmonary vessels are
  random-walk branches rasterised as point clouds and smoothed (not tubes of a distance field).
- **Findings**: COVID-19 as multifocal, mostly bilateral, peripheral and lower-zone ground-glass patches (some with
  crazy paving, consolidation when severe); other pneumonia as a lobar or segmental consolidation with air
  bronchograms (unilateral mostly) or clustered bronchopneumonia nodules; distractors in every class (dependent
  atelectasis, a solid nodule, bullae, a small effusion) so that none of them marks a diagnosis.
- **Acquisition**: longer scan range (240-320 mm, apex to upper abdomen), field of view 320-440 mm with the patient
  off-centre, slice thickness 1.25-7 mm (small mode: 8-12 mm), noise with a filtered-back-projection noise power
  spectrum (ramp times Gaussian, cut-off set by the reconstruction kernel), streaks across the shoulders, cardiac
  motion blur, contrast phase (none, arterial, venous), several vendors' rescale conventions and slice orders.

:func:`write_external_family` writes ``out/dicom/<study>/<series>/``, ``out/labels.csv`` and one lesion mask per
study (``out/lesion-masks/<StudyInstanceUID>.nii.gz``): the same layout as a synthetic site, so fedct ingests it
like one, but it is scored only.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from synthetic.dicom_writer import PatientIdentity, write_ct_series
from synthetic.masks import LESION_MASK_DIR, write_lesion_mask

#: Diagnoses of the family, in fedct's class order (preprocessing.labels.DIAGNOSES).
EXTERNAL_DIAGNOSES = ("covid", "other_pneumonia", "normal")
#: Columns of the family's ``labels.csv`` (fedct's label file format).
LABEL_COLUMNS = ("StudyInstanceUID", "diagnosis", "severe", "time_days", "age", "sex")
#: Lesion weight from which a voxel counts as lesion in the mask.
MASK_WEIGHT = 0.5
_UID_ROOT = "1.2.826.0.1.3680043.10.998"  # the family's own UID namespace (the phantom's sites use another)

#: (manufacturer, model, kernel, kernel cut-off in cycles/pixel, RescaleIntercept, PixelRepresentation)
_SCANNERS = (
    ("Northfield Medical", "NF Helix 64", "LUNG-SHARP", 0.42, -1024.0, 0),
    ("Aurelia Imaging", "Aurelia CT 128", "B60s", 0.47, -1024.0, 1),
    ("Kestrel Systems", "Kestrel 16", "SOFT", 0.26, 0.0, 1),
    ("Osprey Healthcare", "Osprey Dual", "YB", 0.35, -1000.0, 1),
)


@dataclass(frozen=True)
class ExternalStudy:
    """One rendered study: HU volume (slices, rows, columns; slice 0 most inferior) and its lesion mask (bool)."""

    hu: np.ndarray
    lesion_mask: np.ndarray


@dataclass(frozen=True)
class ExternalSummary:
    """What :func:`write_external_family` wrote."""

    out: Path
    studies: int
    files: int
    counts: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class _Grid:
    """World coordinates (mm) of the voxel centres, relative to the body's centre; z grows to the head."""

    z: np.ndarray  # (n, 1, 1)
    y: np.ndarray  # (1, rows, 1), grows to the patient's back
    x: np.ndarray  # (1, 1, cols), grows to the patient's left
    pixel_mm: float
    slice_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.shape[0], self.y.shape[1], self.x.shape[2])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Zero-mean, unit-std random field smoothed with a Gaussian of ``sigma`` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def _lungs(
    g: _Grid, rng: np.random.Generator, *, a_in: float, b_in: float, z_base: float, z_apex: float
) -> tuple[np.ndarray, ...]:
    """Right and left lung masks and the diaphragm height under each (per voxel)."""
    z = g.z
    wide = z_base + 0.45 * (z_apex - z_base)
    taper = np.sqrt(np.clip((z_apex - z) / (z_apex - wide), 0.0, 1.0))  # 1 below the widest level, 0 at the apex
    masks, domes = [], []
    for side in (-1.0, 1.0):  # -x is the patient's right
        cx = side * 0.47 * a_in
        cy = 0.06 * b_in
        rx = (0.40 if side > 0 else 0.44) * a_in * taper  # the left lung leaves room for the heart
        ry = 0.80 * b_in * taper
        theta = np.arctan2(g.y - cy, g.x - cx)
        wobble = sum(rng.uniform(0.02, 0.06) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
        rr = np.sqrt(((g.x - cx) / np.maximum(rx, 1e-3)) ** 2 + ((g.y - cy) / np.maximum(ry, 1e-3)) ** 2)
        dome_top = z_base + (rng.uniform(25.0, 40.0) if side < 0 else rng.uniform(10.0, 25.0))
        depth = rng.uniform(45.0, 70.0)
        rho2 = ((g.x - cx) / (0.4 * a_in)) ** 2 + ((g.y - cy) / (0.8 * b_in)) ** 2
        dome = (
            dome_top - depth * np.minimum(rho2, 1.2) - 12.0 * np.clip((g.y - cy) / b_in, 0.0, None)
        )  # deep posterior recess
        masks.append((rr < 1.0 + wobble) & (taper > 0.05) & (z > dome))
        domes.append(dome)
    return masks[0], masks[1], domes[0], domes[1]


def _branches(
    rng: np.random.Generator, start: np.ndarray, *, n_roots: int, length_mm: tuple[float, float], step_mm: float = 1.5
) -> list[np.ndarray]:
    """Random-walk branches from ``start`` (z, y, x mm); each a (k, 3) array of points. Children leave random points."""
    out: list[np.ndarray] = []
    queue = [(start, rng.normal(size=3), rng.uniform(*length_mm), 0) for _ in range(n_roots)]
    while queue:
        origin, direction, length, depth = queue.pop()
        direction = direction / (np.linalg.norm(direction) + 1e-9)
        n = max(2, int(length / step_mm))
        steps = direction + 0.35 * np.cumsum(rng.normal(size=(n, 3)), axis=0) / np.sqrt(np.arange(1, n + 1))[:, None]
        steps /= np.linalg.norm(steps, axis=1, keepdims=True) + 1e-9
        points = origin + np.cumsum(steps * step_mm, axis=0)
        out.append(points)
        if depth < 3:
            for _ in range(int(rng.integers(1, 3))):
                k = int(rng.integers(n // 3, n))
                queue.append(
                    (points[k], steps[k] + rng.normal(scale=0.8, size=3), length * rng.uniform(0.45, 0.7), depth + 1)
                )
    return out


def _rasterise(g: _Grid, branches: list[np.ndarray], *, radius_mm: float, origin: np.ndarray) -> np.ndarray:
    """Point clouds of ``branches`` as a smooth occupancy in [0, 1] (a Gaussian of ``radius_mm`` around each point)."""
    shape = g.shape
    occ = np.zeros(shape, dtype=np.float32)
    if branches:
        pts = np.concatenate(branches)
        idx = np.rint((pts - origin) / np.array([g.slice_mm, g.pixel_mm, g.pixel_mm])).astype(int)
        keep = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        np.add.at(occ, tuple(idx[keep].T), 1.0)
    sigma = (max(radius_mm / g.slice_mm, 0.3), max(radius_mm / g.pixel_mm, 0.3), max(radius_mm / g.pixel_mm, 0.3))
    occ = ndimage.gaussian_filter(occ, sigma)
    peak = float(occ.max())
    return np.clip(occ / (0.35 * peak), 0.0, 1.0) if peak > 0 else occ


def _fbp_noise(rng: np.random.Generator, shape: tuple[int, int, int], *, std_hu: float, cutoff: float) -> np.ndarray:
    """Per-slice noise with a filtered-back-projection noise power spectrum (ramp x Gaussian), ``std_hu`` HU."""
    _, rows, cols = shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    transfer = np.sqrt(f * np.exp(-((f / cutoff) ** 2))).astype(np.float32)
    noise = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape).astype(np.float32)) * transfer, s=(rows, cols))
    noise = ndimage.gaussian_filter1d(noise, 0.6, axis=0)  # some correlation across slices
    return (noise * (std_hu / (float(noise.std()) + 1e-9))).astype(np.float32)


def _blob(g: _Grid, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Squared normalised distance to ``centre`` for an axis-aligned ellipsoid of ``radii`` (z, y, x mm)."""
    return (
        ((g.z - centre[0]) / radii[0]) ** 2 + ((g.y - centre[1]) / radii[1]) ** 2 + ((g.x - centre[2]) / radii[2]) ** 2
    )


def _covid(
    g: _Grid, rng: np.random.Generator, lung: np.ndarray, pleura_mm: np.ndarray, severity: float, z_base: float
) -> tuple:
    """Peripheral, lower-zone, mostly bilateral ground-glass patches; returns (weight, target HU)."""
    weight = np.zeros(g.shape, dtype=np.float32)
    target = np.full(g.shape, rng.uniform(-620.0, -420.0), dtype=np.float32)
    zz = np.broadcast_to(g.z, g.shape)
    xx = np.broadcast_to(g.x, g.shape)
    candidates = np.argwhere(lung & (pleura_mm < 18.0))
    if len(candidates) == 0:
        return weight, target
    bilateral = rng.random() < 0.85
    side = rng.choice([-1.0, 1.0])
    prefer = np.exp(-(zz[tuple(candidates.T)] - z_base) / 90.0)  # lower zones
    if not bilateral:
        prefer = prefer * (np.sign(xx[tuple(candidates.T)]) == side)
    prefer = prefer / prefer.sum() if prefer.sum() > 0 else np.full(len(candidates), 1.0 / len(candidates))
    texture = _smooth_field(rng, g.shape, (1.0, 1.5, 1.5))
    for _ in range(int(round(2 + 10 * severity))):
        centre = candidates[rng.choice(len(candidates), p=prefer)]
        c_mm = np.array([g.z[centre[0], 0, 0], g.y[0, centre[1], 0], g.x[0, 0, centre[2]]])
        radii = rng.uniform(12.0, 22.0 + 30.0 * severity, size=3)
        d2 = _blob(g, c_mm, radii) * (1.0 + 0.35 * texture)
        weight = np.maximum(weight, np.clip(1.6 * (1.0 - d2), 0.0, 1.0))
    weight *= lung
    if rng.random() < 0.4:  # crazy paving: thickened septa over the ground glass
        septa = np.abs(_smooth_field(rng, g.shape, (0.8, 1.0, 1.0))) < 0.25
        target = target + 180.0 * septa
    if severity > 0.55:  # consolidation in the densest part of severe disease
        target = np.where(weight > 0.9, rng.uniform(-150.0, 20.0), target).astype(np.float32)
    return weight, target


def _bacterial(
    g: _Grid, rng: np.random.Generator, lungs: tuple[np.ndarray, np.ndarray], severity: float, hilum: np.ndarray
) -> tuple:
    """Lobar/segmental consolidation with air bronchograms, or clustered bronchopneumonia nodules; (weight, target HU)."""
    weight = np.zeros(g.shape, dtype=np.float32)
    target = np.full(g.shape, rng.uniform(5.0, 45.0), dtype=np.float32)
    side = int(rng.integers(0, 2))
    lung = lungs[side] | (lungs[1 - side] if rng.random() < 0.2 else False)
    idx = np.argwhere(lungs[side])
    if len(idx) == 0:
        return weight, target
    if rng.random() < 0.7:  # lobar / segmental: a region of one lobe filled from a seed outward
        zz = np.broadcast_to(g.z, g.shape)
        lower = rng.random() < 0.6
        fissure = (np.broadcast_to(g.y, g.shape) - 0.0) * 0.8 + (zz - hilum[0])  # an oblique plane through the hilum
        lobe = lungs[side] & ((fissure > 0) if lower else (fissure <= 0))
        seeds = np.argwhere(lobe)
        if len(seeds) == 0:
            seeds = idx
        seed = seeds[rng.integers(len(seeds))]
        c_mm = np.array([g.z[seed[0], 0, 0], g.y[0, seed[1], 0], g.x[0, 0, seed[2]]])
        radius = 25.0 + 70.0 * severity
        d2 = _blob(g, c_mm, np.array([radius * 1.2, radius, radius])) * (1.0 + 0.25 * _smooth_field(rng, g.shape, 2.0))
        weight = np.clip(1.8 * (1.0 - d2), 0.0, 1.0) * lobe
        airways = _rasterise(
            g,
            _branches(rng, c_mm, n_roots=3, length_mm=(20.0, 45.0)),
            radius_mm=1.2,
            origin=np.array([g.z[0, 0, 0], g.y[0, 0, 0], g.x[0, 0, 0]]),
        )
        target = np.where(airways > 0.5, -850.0, target).astype(np.float32)
    else:  # bronchopneumonia: clusters of small nodules around a few airways
        for _ in range(int(round(2 + 5 * severity))):
            centre = idx[rng.integers(len(idx))]
            c_mm = np.array([g.z[centre[0], 0, 0], g.y[0, centre[1], 0], g.x[0, 0, centre[2]]])
            for _ in range(int(rng.integers(4, 10))):
                p = c_mm + rng.normal(scale=12.0, size=3)
                r = rng.uniform(3.0, 7.0)
                weight = np.maximum(weight, np.clip(2.0 * (1.0 - _blob(g, p, np.array([r, r, r]))), 0.0, 1.0))
        weight *= lung
    return weight, target


def render_external(
    *,
    rows: int,
    n_slices: int,
    pixel_mm: float,
    slice_mm: float,
    diagnosis: str,
    severity: float,
    sex: str,
    rng: np.random.Generator,
    offset_mm: tuple[float, float] = (0.0, 0.0),
    noise_hu: float = 20.0,
    kernel_cutoff: float = 0.35,
) -> ExternalStudy:
    """One chest CT of the external family (float32 HU, slice 0 most inferior) and its lesion mask.

    ``severity`` in [0, 1] scales the extent of the finding (0 for "normal"); ``offset_mm`` (x, y) moves the body's
    centre off the centre of the field of view.
    """
    if diagnosis not in EXTERNAL_DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {EXTERNAL_DIAGNOSES}, got {diagnosis!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity!r}")
    if rows < 16 or n_slices < 8:
        raise ValueError(f"need at least 16 rows and 8 slices, got rows={rows}, n_slices={n_slices}")
    if pixel_mm <= 0 or slice_mm <= 0:
        raise ValueError(f"pixel_mm and slice_mm must be positive, got {pixel_mm!r} and {slice_mm!r}")
    half = (rows - 1) / 2.0 * pixel_mm
    g = _Grid(
        z=(np.arange(n_slices, dtype=np.float32) * slice_mm)[:, None, None],
        y=(np.linspace(-half, half, rows, dtype=np.float32) - offset_mm[1])[None, :, None],
        x=(np.linspace(-half, half, rows, dtype=np.float32) - offset_mm[0])[None, None, :],
        pixel_mm=pixel_mm,
        slice_mm=slice_mm,
    )
    length = n_slices * slice_mm
    shape = g.shape
    hu = np.full(shape, -1000.0, dtype=np.float32)

    # torso: superellipse, fat layer, muscle wall; the table underneath
    a = rng.uniform(140.0, 185.0)
    b = rng.uniform(95.0, 130.0)
    p = rng.uniform(2.2, 3.4)
    fat = rng.uniform(6.0, 30.0)
    body_q = np.abs(g.x / a) ** p + np.abs(g.y / b) ** p
    body = np.broadcast_to(body_q <= 1.0, shape)
    a_in, b_in = a - fat - 10.0, b - fat - 10.0
    inner = np.broadcast_to(np.abs(g.x / a_in) ** p + np.abs(g.y / b_in) ** p <= 1.0, shape)
    wall = np.broadcast_to(np.abs(g.x / (a - fat)) ** p + np.abs(g.y / (b - fat)) ** p <= 1.0, shape)
    hu[body] = -95.0
    hu[wall] = 45.0
    hu[inner] = 30.0
    table_y = b + rng.uniform(8.0, 20.0)
    table = np.broadcast_to((np.abs(g.y - table_y - 6.0) <= 6.0) & (np.abs(g.x) <= 0.9 * a), shape)
    hu[table] = 250.0
    if sex == "F" and rng.random() < 0.8:
        for side in (-1.0, 1.0):
            breast = np.broadcast_to(
                ((g.x - side * 0.45 * a) / 45.0) ** 2 + ((g.y + b) / rng.uniform(20.0, 40.0)) ** 2 <= 1.0, shape
            )
            hu[breast & (g.y < -0.6 * b) & ~body & (g.z > 0.45 * length) & (g.z < 0.8 * length)] = 15.0

    # lungs and diaphragm, abdomen below
    z_base = rng.uniform(0.12, 0.22) * length
    z_apex = rng.uniform(0.9, 1.02) * length
    right, left, dome_r, dome_l = _lungs(g, rng, a_in=a_in, b_in=b_in, z_base=z_base, z_apex=z_apex)
    heart_c = np.array([z_base + rng.uniform(0.2, 0.3) * (z_apex - z_base), -0.3 * b_in, rng.uniform(10.0, 25.0)])
    heart_r = np.array([rng.uniform(38.0, 50.0), rng.uniform(0.3, 0.4) * b_in, rng.uniform(0.32, 0.42) * a_in])
    heart = _blob(g, heart_c, heart_r) <= 1.0
    mediastinum = (_blob(g, heart_c, heart_r * 1.08) <= 1.0) | (
        np.broadcast_to((g.x / 22.0) ** 2 + ((g.y + 0.1 * b_in) / (0.45 * b_in)) ** 2 <= 1.0, shape)
        & (g.z > heart_c[0])
    )
    aorta_x, aorta_y, aorta_r = rng.uniform(18.0, 30.0), 0.42 * b_in, rng.uniform(10.0, 14.0)
    aorta = np.broadcast_to((g.x - aorta_x) ** 2 + (g.y - aorta_y) ** 2 <= aorta_r**2, shape) & (g.z > z_base - 20.0)
    vy = 0.75 * b_in
    spine = np.broadcast_to(g.x**2 + (g.y - vy) ** 2 <= 24.0**2, shape)
    aorta_wall = np.broadcast_to((g.x - aorta_x) ** 2 + (g.y - aorta_y) ** 2 <= (aorta_r + 4.0) ** 2, shape)
    solid = mediastinum | aorta_wall | spine
    right &= ~solid
    left &= ~solid
    lung = right | left
    abdomen = inner & (g.z < np.maximum(dome_r, dome_l))
    liver = abdomen & (g.x < 40.0)
    hu[abdomen] = 35.0
    hu[liver] = rng.uniform(50.0, 65.0)
    stomach = _blob(g, np.array([z_base - 5.0, -0.2 * b_in, 0.45 * a_in]), np.array([30.0, 35.0, 40.0])) <= 1.0
    hu[abdomen & stomach & (g.y < -0.2 * b_in)] = -900.0  # gas above the fluid level (patient supine)
    hu[abdomen & stomach & (g.y >= -0.2 * b_in)] = 15.0
    hu[mediastinum & inner & ~abdomen] = -80.0
    phase = rng.choice(["none", "arterial", "venous"], p=[0.5, 0.25, 0.25])
    blood = {"none": 42.0, "arterial": rng.uniform(250.0, 380.0), "venous": rng.uniform(120.0, 170.0)}[phase]
    hu[heart] = blood
    hu[heart & (_blob(g, heart_c, heart_r * 1.0) > 0.6)] = 45.0 if phase == "none" else 90.0  # myocardium
    hu[aorta] = blood
    hu[lung] = -870.0

    # bones: vertebra with canal, rib arcs, sternum
    vert = np.broadcast_to(g.x**2 + (g.y - vy) ** 2 <= 17.0**2, shape)
    hu[vert] = 230.0
    hu[vert & np.broadcast_to(g.x**2 + (g.y - vy) ** 2 >= 14.0**2, shape)] = 650.0
    hu[np.broadcast_to(g.x**2 + (g.y - vy - 28.0) ** 2 <= 8.0**2, shape)] = 15.0
    ring = np.abs(g.x / (a_in + 4.0)) ** p + np.abs(g.y / (b_in + 4.0)) ** p
    theta = np.arctan2(g.y, g.x)
    rib_period = rng.uniform(24.0, 32.0)
    ribs = (np.abs(ring - 1.0) < 0.05) & (np.sin(2 * np.pi * (g.z + 18.0 * np.sin(theta)) / rib_period) > 0.55)
    hu[ribs & (g.z > z_base - 30.0)] = 550.0
    sternum = np.broadcast_to(g.x**2 / 20.0**2 + (g.y + b_in + 2.0) ** 2 / 7.0**2 <= 1.0, shape)
    hu[sternum & (g.z > heart_c[0] - 30.0)] = 380.0

    # lung parenchyma: texture, gravity gradient, vessels, airways
    hu = np.where(lung, -870.0 + 18.0 * _smooth_field(rng, shape, 1.2) + 45.0 * np.clip(g.y / b_in, -1.0, 1.0), hu)
    origin = np.array([g.z[0, 0, 0], g.y[0, 0, 0], g.x[0, 0, 0]])
    hilum_z = heart_c[0] + rng.uniform(25.0, 45.0)
    hila = [np.array([hilum_z, 0.0, s * 0.25 * a_in]) for s in (-1.0, 1.0)]
    vessels = _rasterise(
        g,
        [br for h in hila for br in _branches(rng, h, n_roots=6, length_mm=(60.0, 120.0))],
        radius_mm=1.6,
        origin=origin,
    )
    hu = np.where(lung, hu + vessels * (blood - hu) * 0.9, hu)
    carina = np.array([hilum_z + 15.0, -0.05 * b_in, 0.0])
    trachea = np.broadcast_to(g.x**2 + (g.y - carina[1]) ** 2 <= 9.0**2, shape) & (g.z > carina[0])
    hu[trachea & inner] = -990.0
    bronchi = _rasterise(
        g,
        [carina + np.outer(np.arange(1, 22), [-1.0, 0.3, s * 1.2]) for s in (-1.0, 1.0)],
        radius_mm=3.5,
        origin=origin,
    )
    hu[(bronchi > 0.5) & (lung | (mediastinum & ~heart))] = -980.0

    # distractors in every class, so that none marks a diagnosis
    pleura_mm = ndimage.distance_transform_edt(lung, sampling=(slice_mm, pixel_mm, pixel_mm)).astype(np.float32)
    if rng.random() < 0.35:  # dependent atelectasis: a posterior band in the lower zones
        band = (
            lung & (pleura_mm < rng.uniform(4.0, 9.0)) & (g.y > 0.35 * b_in) & (g.z < z_base + 0.4 * (z_apex - z_base))
        )
        hu[band] = rng.uniform(-550.0, -350.0)
    if rng.random() < 0.3:  # a solid nodule
        where = np.argwhere(lung & (pleura_mm > 10.0))
        if len(where):
            c = where[rng.integers(len(where))]
            r = rng.uniform(3.0, 6.0)
            hu[_blob(g, np.array([g.z[c[0], 0, 0], g.y[0, c[1], 0], g.x[0, 0, c[2]]]), np.array([r, r, r])) <= 1.0] = (
                40.0
            )
    if rng.random() < 0.2:  # apical bullae
        bullae = lung & (g.z > z_base + 0.75 * (z_apex - z_base)) & (_smooth_field(rng, shape, 2.0) > 1.6)
        hu[bullae] = -965.0
    if rng.random() < 0.1:  # a small effusion: fluid in the lowest, most posterior lung
        effusion = lung & (g.y > 0.55 * b_in) & (g.z < z_base + 40.0)
        hu[effusion] = 12.0

    # the finding
    weight = np.zeros(shape, dtype=np.float32)
    if diagnosis == "covid" and severity > 0:
        weight, target = _covid(g, rng, lung, pleura_mm, severity, z_base)
        hu += weight * (target - hu)
    elif diagnosis == "other_pneumonia" and severity > 0:
        weight, target = _bacterial(g, rng, (right, left), severity, hila[0])
        hu += weight * (target - hu)
    lesion_mask = weight >= MASK_WEIGHT

    # acquisition: slab averaging, motion, streaks, FBP noise
    if slice_mm > 2.0 * pixel_mm:
        hu = ndimage.gaussian_filter1d(hu, 0.35, axis=0)
    if rng.random() < 0.3:  # cardiac motion: a doubled edge near the heart on a few slices
        k = int(np.clip((heart_c[0] - g.z[0, 0, 0]) / slice_mm, 0, n_slices - 1))
        for s in range(max(0, k - 2), min(n_slices, k + 3)):
            hu[s] = 0.5 * (hu[s] + ndimage.shift(hu[s], (0.0, rng.uniform(1.0, 2.5)), order=1, mode="nearest"))
    top = int(0.85 * n_slices)
    for s in range(top, n_slices):  # streaks across the shoulders
        angle = rng.uniform(-0.3, 0.3)
        d = np.abs(np.cos(angle) * g.y[0] - np.sin(angle) * g.x[0] - rng.uniform(-0.3, 0.3) * b)
        hu[s] += np.where(body[s], -60.0 * np.exp(-((d / 4.0) ** 2)), 0.0)
    hu += np.where(body | table, _fbp_noise(rng, shape, std_hu=noise_hu, cutoff=kernel_cutoff), 0.0)
    return ExternalStudy(hu=np.clip(hu, -1024.0, 3000.0).astype(np.float32), lesion_mask=lesion_mask)


def write_external_family(
    out: Path,
    *,
    studies: int = 24,
    seed: int = 0,
    small: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExternalSummary:
    """Write ``studies`` external-family studies (a third of each diagnosis, rest to COVID and normal) under ``out``.

    ``small``: 32x32 images and 8-12 mm slices (seconds per study, matching the benchmark's small sites); otherwise
    128x128 images and 1.25-7 mm slices. Reuses nothing of the training generator but the DICOM and mask writers.
    """
    if isinstance(studies, bool) or not isinstance(studies, int) or studies < 2:
        raise ValueError(f"studies must be an integer >= 2, got {studies!r}")
    start = time.perf_counter()
    out = Path(out)
    family_rng = np.random.default_rng([seed, 998])
    diagnoses = [EXTERNAL_DIAGNOSES[i % 3] for i in range(studies)]
    family_rng.shuffle(diagnoses)
    rows_written = []
    files = 0
    for j, diagnosis in enumerate(diagnoses):
        rng = np.random.default_rng([seed, 998, j])
        maker, model, kernel, cutoff, intercept, representation = _SCANNERS[int(rng.integers(len(_SCANNERS)))]
        rows = 32 if small else 128
        fov = rng.uniform(330.0, 440.0) if not small else rng.uniform(360.0, 420.0)
        pixel = round(fov / rows, 3)
        slice_mm = float(rng.choice([8.0, 10.0, 12.0] if small else [1.25, 2.0, 2.5, 3.0, 5.0, 7.0]))
        n_slices = max(8, int(round(rng.uniform(240.0, 320.0) / slice_mm)))
        severity = 0.0 if diagnosis == "normal" else float(np.clip(rng.beta(2.0, 2.5), 0.1, 1.0))
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(np.clip(round(rng.normal(64.0 if diagnosis != "normal" else 52.0, 13.0)), 22, 92))
        study = render_external(
            rows=rows,
            n_slices=n_slices,
            pixel_mm=pixel,
            slice_mm=slice_mm,
            diagnosis=diagnosis,
            severity=severity,
            sex=sex,
            rng=rng,
            offset_mm=tuple(rng.uniform(-20.0, 20.0, size=2)),
            noise_hu=float(rng.uniform(10.0, 40.0)),
            kernel_cutoff=cutoff,
        )
        hazard = {"covid": 0.012, "other_pneumonia": 0.009, "normal": 0.0015}[diagnosis] * math.exp(
            3.0 * severity + 0.3 * (age - 60) / 10.0
        )
        event = max(1, math.ceil(rng.exponential(1.0 / hazard)))
        severe = int(event <= 60)
        uid = f"{_UID_ROOT}.{seed}.{j + 1}"
        reverse = bool(rng.random() < 0.4)
        origin = (-(rows - 1) / 2.0 * pixel, -(rows - 1) / 2.0 * pixel, round(float(rng.uniform(-420.0, -300.0)), 2))
        identity = PatientIdentity(
            PatientName=f"EXTERNAL^CASE{j + 1:03d}",
            PatientID=f"X{seed:02d}{j + 1:05d}",
            PatientBirthDate=f"{2022 - age}0615",
            PatientSex=sex,
            PatientAge=f"{age:03d}Y",
        )
        paths = write_ct_series(
            out / "dicom" / f"case-{j + 1:03d}" / "ct",
            study.hu,
            pixel_spacing_mm=(pixel, pixel),
            slice_spacing_mm=slice_mm,
            slice_thickness_mm=slice_mm,
            origin_mm=origin,
            study_instance_uid=uid,
            series_instance_uid=f"{uid}.1",
            patient=identity,
            study_date="20220615",
            accession_number=f"EXT{seed:02d}{j + 1:04d}",
            manufacturer=maker,
            manufacturer_model_name=model,
            institution_name="External Validation Hospital",
            rescale_intercept=intercept,
            pixel_representation=representation,
            uid_entropy=[_UID_ROOT, seed, j],
            series_description="THORAX",
            kvp=float(rng.choice([100.0, 120.0, 140.0])),
            convolution_kernel=kernel,
            reverse_instance_order=reverse,
        )
        files += len(paths)
        write_lesion_mask(
            out / LESION_MASK_DIR / f"{uid}.nii.gz",
            study.lesion_mask,
            origin_mm=origin,
            pixel_spacing_mm=(pixel, pixel),
            slice_spacing_mm=slice_mm,
            reverse_instance_order=reverse,
        )
        rows_written.append(
            {
                "StudyInstanceUID": uid,
                "diagnosis": diagnosis,
                "severe": severe,
                "time_days": event if severe else 60,
                "age": age,
                "sex": sex,
            }
        )
        if progress is not None:
            progress(
                f"external: wrote case-{j + 1:03d} ({diagnosis}, {n_slices} x {slice_mm:g} mm, {len(paths)} files)"
            )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows_written)
    counts = {d: diagnoses.count(d) for d in EXTERNAL_DIAGNOSES}
    return ExternalSummary(out, studies, files, counts, round(time.perf_counter() - start, 3))


#: File in an external family's folder recording the settings it was written with (:func:`ensure_external_family`).
FAMILY_MARKER = "family.json"


def ensure_external_family(
    out: Path,
    *,
    studies: int,
    seed: int = 0,
    small: bool = False,
    derived: tuple[Path, ...] = (),
    progress: Callable[[str], None] | None = None,
) -> bool:
    """The external family under ``out`` with these settings: reused when :data:`FAMILY_MARKER` records them, else
    written afresh; returns True when written. What a family of other settings (or an interrupted write) left is
    removed first — only what :func:`write_external_family` writes, nothing else in ``out`` — and with it the folders
    in ``derived`` (its ingestion): written over, a smaller family would keep a larger one's extra studies, and a
    case folder of another seed would hold two series."""
    out = Path(out)
    wanted = {"studies": studies, "seed": seed, "small": small}
    marker = out / FAMILY_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return False
    marker.unlink(missing_ok=True)
    (out / "labels.csv").unlink(missing_ok=True)
    for old in (out / "dicom", out / LESION_MASK_DIR, *map(Path, derived)):
        if old.exists():
            shutil.rmtree(old)
    write_external_family(out, studies=studies, seed=seed, small=small, progress=progress)
    marker.write_text(json.dumps(wanted))
    return True
