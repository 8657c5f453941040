"""bench.preprocess in its tiny size: the read floor, the MONAI tutorial chain and fedct's ingestion on the same series."""

import json

from bench.common import BenchOptions
from bench.preprocess import ARMS, read_floor, run


def test_tiny_preprocess_benchmark_compares_three_arms(tmp_path):
    data = json.loads(run(BenchOptions(out=tmp_path, tiny=True)).read_text())
    assert data["benchmark"] == "preprocess" and data["input_size"] == [64, 64, 48]
    tested = [s for s, r in data["results"].items() if "arms" in r]
    assert "uncompressed" in tested and len(tested) >= 2, data["results"]
    for syntax in tested:
        result = data["results"][syntax]
        assert result["series"] == 2 and result["files"] == 10 + 12
        for arm in ARMS:
            entry = result["arms"][arm]
            assert "errors" not in entry, entry
            assert entry["series_per_second"] > 0 and entry["peak_rss_mib"] > 50
        assert result["arms"]["a_read_floor"]["output_shape"] == [10, 32, 32] or result["arms"]["a_read_floor"][
            "output_shape"
        ] == [12, 32, 32]
        assert result["arms"]["b_monai_tutorial"]["output_shape"] == [1, 64, 64, 48]
        a, b, c = (result["arms"][arm]["series_per_second"] for arm in ARMS)
        assert result["ratio_c_over_a"] == c / a and result["ratio_c_over_b"] == c / b


def test_read_floor_applies_the_modality_lut(tmp_path):
    import numpy as np

    from bench.preprocess import _write_series

    paths = _write_series(tmp_path / "s", rows=32, slices=10, index=0)
    assert read_floor(str(paths[0].parent)) == (10, 32, 32)
    del np
