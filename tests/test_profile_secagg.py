"""preprocessing/profile_secagg.py: the sites' statistics vectors for SecAgg+ are exact whole numbers under Flower's
own quantization, their sum decodes to the plain pooled normalisation within the stated bound, the floor is the
site's, and a sum that cannot come from honest sites is refused. (The exchange end to end: test_fl_server_secagg.)"""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from types import MappingProxyType

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from preprocessing.labels import DIAGNOSES
from preprocessing.profile import VariableStatistics, aggregate_statistics, read_schema, read_site_profile
from preprocessing.profile_features import ProfileNormalisation, ProfileStatisticsError
from preprocessing.profile_secagg import (
    CLIPPING_RANGE,
    COUNT_LIMBS,
    LIMB_BITS,
    MAX_SITES,
    MODULUS_RANGE,
    QUANTIZATION_RANGE,
    SUM_LIMBS,
    SecureLayout,
    error_bounds,
    variable_span,
)
from synthetic.hospitals import LABEL_COLUMNS
from synthetic.profiles import write_site_profile

SCHEMA = read_schema()
LAYOUT = SecureLayout.from_schema(SCHEMA)


def _table(folder, n: int, index: int):
    folder.mkdir()
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for j in range(n):
            writer.writerow([f"1.2.{index}.{j + 1}", DIAGNOSES[j % 3], j % 2, 9 if j % 2 else 28, 40 + j, "FM"[j % 2]])
    write_site_profile(folder, site_index=index, seed=index + 3)
    return read_site_profile(folder)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Three synthetic sites' statistics (three export styles, differently missing), at the floor k = 5."""
    root = tmp_path_factory.mktemp("secagg-stats")
    return [aggregate_statistics(_table(root / f"s{i}", n, i), min_count=5) for i, n in enumerate((40, 23, 61))]


def test_each_variable_is_scaled_by_the_schema_range():
    assert variable_span(SCHEMA.variable("age")) == (0.0, 120.0)
    assert variable_span(SCHEMA.variable("ifi27_expression")) == (-10.0, 25.0)
    assert variable_span(SCHEMA.variable("spo2")) == (40.0, 60.0)
    assert variable_span(SCHEMA.variable("diabetes")) == (0.0, 1.0)
    assert variable_span(SCHEMA.variable("sex")) == (0.0, 1.0)  # two categories: index 0 or 1
    assert LAYOUT.size == COUNT_LIMBS + len(SCHEMA.names) * (COUNT_LIMBS + 2 * SUM_LIMBS)
    assert LAYOUT.signature.startswith("F52;L21;age:0:120;sex:0:1;")
    with pytest.raises(ValueError, match="width"):
        SecureLayout(variables=("a",), low=(0.0,), width=(0.0,))


def test_a_vector_is_whole_numbers_that_flowers_quantization_keeps_exactly(sites):
    """Under the SecAgg+ settings the stats exchange uses, quantize() maps every limb to itself + clipping range
    (stochastic rounding of a whole number is that number), so the secure sum has no quantization error."""
    for stats in sites:
        vector = LAYOUT.encode(stats, min_count=5)
        assert vector.shape == (LAYOUT.size,) and vector.dtype == np.float64
        assert np.all(vector == np.rint(vector)) and vector.min() >= 0 and vector.max() < 2**LIMB_BITS
        for _ in range(3):  # random rounding: repeat
            (q,) = quantize([vector], CLIPPING_RANGE, QUANTIZATION_RANGE)
            assert np.array_equal(q.astype(np.int64), vector.astype(np.int64) + 2**LIMB_BITS)
    # the sum of MAX_SITES sites' quantized limbs stays below SecAgg+'s modulus
    assert MAX_SITES * QUANTIZATION_RANGE < MODULUS_RANGE <= (MAX_SITES + 1) * QUANTIZATION_RANGE


def _secure_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """What Flower's unmask stage computes for weight-1 sites (masks cancelled): dequantized mean, times the sites."""
    quantized = [quantize([v], CLIPPING_RANGE, QUANTIZATION_RANGE)[0].astype(np.int64) for v in vectors]
    total = sum(quantized) % MODULUS_RANGE
    (recon,) = dequantize([total], CLIPPING_RANGE, QUANTIZATION_RANGE)
    mean = (recon - (len(vectors) - 1) * CLIPPING_RANGE) * (1 / len(vectors))
    return mean * len(vectors)


def test_the_secure_sum_decodes_to_the_plain_pooling_within_the_stated_bound(sites):
    plain = ProfileNormalisation.pooled(SCHEMA, sites)
    pooled = LAYOUT.decode(
        _secure_sum([LAYOUT.encode(s, min_count=5) for s in sites]), sites=3, min_count=5, count_bound=1000
    )
    secure = pooled.normalisation(SCHEMA, min_count=5)
    assert pooled.rows == 40 + 23 + 61 and secure.sites == 3
    assert secure.count == plain.count and secure.variables == plain.variables
    usable = 0
    for j, name in enumerate(SCHEMA.names):
        width = LAYOUT.width[j]
        float_slack = 1e-12 * (width + abs(LAYOUT.low[j]))  # float64 rounding of the plain sums themselves
        assert abs(secure.mean[j] - plain.mean[j]) <= pooled.mean_error[j] + float_slack, name
        assert abs(secure.std[j] - plain.std[j]) <= pooled.std_error[j] + float_slack, name
        usable += plain.count[j] > 0
    assert usable >= 10  # the comparison covers most variables (some are withheld or never exported)
    # the stated precision: ferritin (range 1e5) pooled over 3 sites and 100 studies, SD 500
    mean_bound, sd_bound = error_bounds(width=1e5, count=100, sites=3, std=500.0)
    assert math.isclose(mean_bound, 1e5 * 3 * 2**-53 / 100, rel_tol=1e-12) and mean_bound < 3.5e-13
    assert sd_bound < 2.1e-10


def test_the_floor_is_the_sites_a_variable_below_it_contributes_zeros(sites):
    stats = sites[1]  # 23 rows
    name = next(n for n in SCHEMA.names if n in stats.variables and stats.variables[n].count < stats.n_rows)
    j = SCHEMA.names.index(name)
    per = COUNT_LIMBS + 2 * SUM_LIMBS
    at = COUNT_LIMBS + j * per
    # a raised floor above this variable's count: zeros for it, the rows still counted
    strict = LAYOUT.encode(stats, min_count=stats.variables[name].count + 1)
    assert np.all(strict[at : at + per] == 0) and strict[0] == 23
    # a site with fewer rows than the floor: nothing but zeros
    assert not LAYOUT.encode(stats, min_count=24).any()
    # even statistics that slipped below the floor (a count of 3) are sent as zeros
    low = replace(
        stats,
        variables=MappingProxyType({**stats.variables, name: VariableStatistics(count=3, sum=1.0, sum_squares=1.0)}),
    )
    assert np.all(LAYOUT.encode(low, min_count=5)[at : at + per] == 0)


def test_a_sum_no_honest_sites_can_give_is_refused_naming_the_check(sites):
    vectors = [LAYOUT.encode(s, min_count=5) for s in sites]
    total = _secure_sum(vectors)
    per = COUNT_LIMBS + 2 * SUM_LIMBS
    j = next(i for i, c in enumerate(ProfileNormalisation.pooled(SCHEMA, sites).count) if c > 0)
    at = COUNT_LIMBS + j * per

    def refused(vector, match, **kwargs):
        with pytest.raises(ProfileStatisticsError, match=match):
            LAYOUT.decode(vector, **{"sites": 3, "min_count": 5, "count_bound": 1000, **kwargs})

    refused(total * 1.5, "whole numbers")  # a site sent another weight
    refused(total[:-1], "finite numbers")
    refused(np.where(np.arange(total.size) == at, 3.0, total), "pooled count")  # 3 < k: not from honest sites
    bad = total.copy()
    bad[at] = bad[0] + 1  # more studies with the variable than pooled rows
    refused(bad, "pooled count")
    bad = total.copy()
    bad[at + COUNT_LIMBS + SUM_LIMBS : at + per] = 0  # a sum of squares of 0 with a non-zero sum
    refused(bad, "inconsistent")
    bad = total.copy()
    bad[at : at + per] = 0
    bad[at + COUNT_LIMBS] = 5  # sums without a count
    refused(bad, "count 0")
    refused(total, "rows", count_bound=10)
    refused(total, "2 to", sites=1)
    assert LAYOUT.decode(total, sites=3, min_count=5, count_bound=1000).rows == 124
