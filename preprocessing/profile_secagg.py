"""A site's profile statistics as a vector for secure aggregation (SecAgg+), and the pooled sum back (no flwr here).

With ``secure-aggregation = true`` the profile statistics exchange before round 1 runs through Flower's SecAgg+
workflow like training (``fl_server.secagg``, ``fl_client.secagg``): each site sends a masked vector, the server
learns only the sum over the sites. This module fixes what the vector holds so that the sum is **exact** up to a
stated fixed-point rounding, despite SecAgg+'s quantization.

Scaling per variable from the schema's allowed range ``[low, high]`` (bool: [0, 1]; category: [0, K - 1]): a value x
becomes ``y = (x - low) / w`` with ``w = high - low``, so ``0 <= y <= 1``. A site sends, per variable, its count n,
``S = sum(y)`` and ``Q = sum(y**2)`` (both in ``[0, n]``), and its number of usable rows; a variable measured in
fewer than k studies (the privacy floor, enforced **at the site**: the server cannot see one site's count) and every
variable of a site with fewer than k rows contribute zeros.

Exact integers: S and Q are rounded to multiples of ``2**-FRACTION_BITS`` (counts are whole already) and every
resulting integer is split into base-``2**LIMB_BITS`` digits ("limbs"), each in ``[0, 2**21)``. SecAgg+ runs with
``clipping_range = 2**21`` and ``quantization_range = 2**22`` (quantizer step exactly 1) and weight 1 per site
(``num_examples = max_weight = 1``): a whole number in range is its own quantization (stochastic rounding of an
integer is that integer), and the sum of at most :data:`MAX_SITES` sites' limbs stays below the modulus ``2**32``.
The server reassembles each pooled quantity from its limb sums exactly (Python integers).

Precision (per variable, ``m`` summed sites, pooled count N, the only error being each site's rounding of S and Q,
at most ``2**-(FRACTION_BITS + 1)`` each): the pooled ``S/N`` and ``Q/N`` are within ``eps = m * 2**-53 / N`` of the
exact ones, so the mean is within ``w * eps`` and the variance within ``w**2 * (3 * eps + eps**2)`` of the plain
(non-secure) pooling; the standard deviation within the smaller of ``sqrt`` of that and that divided by the SD
(:func:`error_bounds`). For ferritin (``w = 1e5``) with 3 sites and N = 100: 3.3e-13 ng/mL on the mean, 2e-10 ng/mL
on an SD of 500. With 52 fraction bits a scaled sum is kept to the precision of a float64 number of its size, so the
secure normalisation equals the plain one up to floating-point rounding (about 1e-15 relative, which the plain
pooling's float64 sums have as well and which the bounds do not include).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from preprocessing.profile import ProfileSchema, ProfileStatistics, Variable
from preprocessing.profile_features import ProfileNormalisation, ProfileStatisticsError

#: Bits per limb: every number a site sends is a whole number in [0, 2**LIMB_BITS).
LIMB_BITS = 21
#: SecAgg+ settings under which a limb is its own quantization (quantizer step 2 * clipping / quantization = 1).
CLIPPING_RANGE = float(2**LIMB_BITS)
QUANTIZATION_RANGE = 2 ** (LIMB_BITS + 1)
MODULUS_RANGE = 2**32
#: Most sites whose quantized limbs (each < 2**22 after SecAgg+'s shift by the clipping range) sum below 2**32.
MAX_SITES = MODULUS_RANGE // QUANTIZATION_RANGE - 1
#: Fixed-point fraction bits of the scaled sums S and Q (a site's rounding error is at most 2**-53 each).
FRACTION_BITS = 52
#: Limbs of a count (counts below 2**42) and of a scaled sum (S, Q <= count <= MAX_SITE_COUNT: S * 2**52 < 2**84).
COUNT_LIMBS, SUM_LIMBS = 2, 4
#: The largest count a site may report (far above any hospital; keeps S * 2**52 within SUM_LIMBS).
MAX_SITE_COUNT = 2**31 - 1
#: Key of the statistics request naming the layout (:attr:`SecureLayout.signature`); its presence asks for the
#: secure vector instead of the plain lists.
LAYOUT_KEY = "profile-secagg-layout"


def variable_span(variable: Variable) -> tuple[float, float]:
    """``(low, w)``: the scaling of ``variable`` from the schema, ``y = (x - low) / w`` in [0, 1]."""
    if variable.type == "bool":
        return 0.0, 1.0
    if variable.type == "category":
        return 0.0, float(max(len(variable.categories) - 1, 1))
    if variable.range is None:
        raise ValueError(f"profile variable {variable.name!r} ({variable.type}) has no range to scale by")
    low, high = variable.range
    return float(low), float(high - low)


def _limbs(value: int, count: int) -> list[int]:
    mask = (1 << LIMB_BITS) - 1
    if value < 0 or value >> (LIMB_BITS * count):
        raise ValueError(f"{value} does not fit {count} limbs of {LIMB_BITS} bits")
    return [(value >> (LIMB_BITS * i)) & mask for i in range(count)]


def _join(limb_sums: Sequence[int]) -> int:
    return sum(int(v) << (LIMB_BITS * i) for i, v in enumerate(limb_sums))


@dataclass(frozen=True)
class SecureLayout:
    """The vector layout of the schema's variables: their scalings, in schema order."""

    variables: tuple[str, ...]
    low: tuple[float, ...]
    width: tuple[float, ...]
    fraction_bits: int = FRACTION_BITS

    def __post_init__(self) -> None:
        n = len(self.variables)
        if n < 1 or len(self.low) != n or len(self.width) != n:
            raise ValueError(f"secure layout: {n} variables, {len(self.low)} lows, {len(self.width)} widths")
        if not all(
            math.isfinite(lo) and math.isfinite(w) and w > 0 for lo, w in zip(self.low, self.width, strict=True)
        ):
            raise ValueError("secure layout: every low must be finite and every width finite and > 0")

    @classmethod
    def from_schema(cls, schema: ProfileSchema) -> SecureLayout:
        spans = [variable_span(v) for v in schema.variables]
        return cls(variables=schema.names, low=tuple(lo for lo, _ in spans), width=tuple(w for _, w in spans))

    @property
    def signature(self) -> str:
        """A short text naming the layout (both sides compare it: same variables, scalings and fraction bits)."""
        parts = [f"{name}:{lo:g}:{w:g}" for name, lo, w in zip(self.variables, self.low, self.width, strict=True)]
        return f"F{self.fraction_bits};L{LIMB_BITS};" + ";".join(parts)

    @property
    def size(self) -> int:
        """Length of a site's vector: the rows' limbs, then per variable the count's, S's and Q's."""
        return COUNT_LIMBS + len(self.variables) * (COUNT_LIMBS + 2 * SUM_LIMBS)

    def encode(self, stats: ProfileStatistics, *, min_count: int) -> np.ndarray:
        """A site's vector (float64 holding whole numbers in [0, 2**21)): zeros for a variable below ``min_count``
        (and for every variable when the site has fewer than ``min_count`` rows). ValueError for a count above
        :data:`MAX_SITE_COUNT` or a variable the layout does not know."""
        unknown = set(stats.variables) - set(self.variables)
        if unknown:
            raise ValueError(f"statistics of {len(unknown)} variable(s) the secure layout does not have")
        rows = int(stats.n_rows) if stats.n_rows >= min_count else 0
        if rows > MAX_SITE_COUNT:
            raise ValueError(f"{rows} profile rows exceed the secure aggregation's limit {MAX_SITE_COUNT}")
        out = _limbs(rows, COUNT_LIMBS)
        scale = 2.0**self.fraction_bits
        for name, low, width in zip(self.variables, self.low, self.width, strict=True):
            s = stats.variables.get(name) if rows else None
            if s is None or s.count < min_count:
                out.extend([0] * (COUNT_LIMBS + 2 * SUM_LIMBS))
                continue
            n = int(s.count)
            if n > rows:
                raise ValueError(f"{name}: count above the number of rows")
            # y = (x - low) / w in [0, 1]: S = sum(y), Q = sum(y**2), both in [0, n] (clipped against float rounding)
            total = min(max((s.sum - n * low) / width, 0.0), float(n))
            squares = (s.sum_squares - 2.0 * low * s.sum + n * low * low) / (width * width)
            squares = min(max(squares, 0.0), float(n))
            out.extend(_limbs(n, COUNT_LIMBS))
            out.extend(_limbs(round(total * scale), SUM_LIMBS))
            out.extend(_limbs(round(squares * scale), SUM_LIMBS))
        return np.asarray(out, dtype=np.float64)

    def decode(self, total: np.ndarray, *, sites: int, min_count: int, count_bound: int) -> SecurePooled:
        """The pooled statistics from the SecAgg+ sum of ``sites`` vectors; :class:`ProfileStatisticsError` naming
        the check that fails (not whole numbers: a site used another weight or layout; a pooled count between 1 and
        ``min_count - 1`` or above the pooled rows; sums that cannot belong to the count)."""
        if not 2 <= sites <= MAX_SITES:
            raise ProfileStatisticsError(f"secure profile statistics need 2 to {MAX_SITES} sites, got {sites}")
        vector = np.asarray(total, dtype=np.float64).ravel()
        if vector.shape != (self.size,) or not np.all(np.isfinite(vector)):
            raise ProfileStatisticsError(f"the secure sum must be {self.size} finite numbers, got {vector.size}")
        whole = np.rint(vector)
        if np.max(np.abs(vector - whole)) > 1e-6:
            raise ProfileStatisticsError("the secure sum is not whole numbers (a site used another weight or layout)")
        limbs = [int(v) for v in whole]
        if min(limbs) < 0 or max(limbs) > sites * ((1 << LIMB_BITS) - 1):
            raise ProfileStatisticsError("a limb of the secure sum is outside [0, sites x 2**21)")
        rows = _join(limbs[:COUNT_LIMBS])
        if rows > sites * count_bound:
            raise ProfileStatisticsError(f"pooled profile rows above {sites} x the count bound {count_bound}")
        scale = 2.0**self.fraction_bits
        per = COUNT_LIMBS + 2 * SUM_LIMBS
        counts, mean, std, mean_err, std_err = [], [], [], [], []
        for j, (name, low, width) in enumerate(zip(self.variables, self.low, self.width, strict=True)):
            at = COUNT_LIMBS + j * per
            n = _join(limbs[at : at + COUNT_LIMBS])
            s_int = _join(limbs[at + COUNT_LIMBS : at + COUNT_LIMBS + SUM_LIMBS])
            q_int = _join(limbs[at + COUNT_LIMBS + SUM_LIMBS : at + per])
            if n == 0:
                if s_int or q_int:
                    raise ProfileStatisticsError(f"{name}: pooled count 0 with non-zero sums")
                counts.append(0)
                mean.append(0.0)
                std.append(0.0)
                mean_err.append(0.0)
                std_err.append(0.0)
                continue
            if n < min_count or n > rows:
                raise ProfileStatisticsError(
                    f"{name}: pooled count must be 0 or in [{min_count}, pooled rows] (every site's is 0 or >= "
                    f"the floor {min_count})"
                )
            if s_int > n << self.fraction_bits or q_int > n << self.fraction_bits:
                raise ProfileStatisticsError(f"{name}: a pooled scaled sum exceeds the pooled count")
            s, q = s_int / scale, q_int / scale
            slack = sites * 2.0 ** -(self.fraction_bits - 1)  # each site's rounding of S and Q
            if s * s > n * q + (2 * n + 1) * slack:
                raise ProfileStatisticsError(f"{name}: pooled sum of squares inconsistent with the sum and count")
            m_y = s / n
            var_y = max(q / n - m_y * m_y, 0.0)
            counts.append(n)
            mean.append(low + width * m_y)
            std.append(width * math.sqrt(var_y))
            bound_mean, bound_std = error_bounds(
                width=width, count=n, sites=sites, std=std[-1], bits=self.fraction_bits
            )
            mean_err.append(bound_mean)
            std_err.append(bound_std)
        return SecurePooled(
            rows=rows,
            sites=sites,
            count=tuple(counts),
            mean=tuple(mean),
            std=tuple(std),
            mean_error=tuple(mean_err),
            std_error=tuple(std_err),
        )


def error_bounds(*, width: float, count: int, sites: int, std: float, bits: int = FRACTION_BITS) -> tuple[float, float]:
    """``(mean, sd)`` bounds on the deviation of the securely pooled moments of a variable of scale ``width`` from
    the plain pooling (module doc): ``eps = sites * 2**-(bits+1) / count``; mean ``w * eps``; variance
    ``w**2 * (3 eps + eps**2)``; SD the smaller of its square root and the variance bound divided by ``std``."""
    eps = sites * 2.0 ** -(bits + 1) / count
    var = width * width * (3 * eps + eps * eps)
    sd = math.sqrt(var) if std <= 0 else min(math.sqrt(var), var / std)
    return width * eps, sd


@dataclass(frozen=True)
class SecurePooled:
    """What the server learns from the secure sum: pooled rows and, per variable (layout order), the pooled count,
    mean and population SD, with the bound on each moment's deviation from plain pooling (:func:`error_bounds`)."""

    rows: int
    sites: int
    count: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mean_error: tuple[float, ...]
    std_error: tuple[float, ...]

    def normalisation(self, schema: ProfileSchema, *, min_count: int) -> ProfileNormalisation:
        """The run's :class:`~preprocessing.profile_features.ProfileNormalisation` (what the bundles store)."""
        return ProfileNormalisation(
            variables=schema.names,
            mean=self.mean,
            std=self.std,
            count=self.count,
            sites=self.sites,
            min_count=min_count,
            schema=f"{schema.name} v{schema.version}",
        )
