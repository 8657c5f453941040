"""bench/fusion.py in its tiny size: image, profile-only, late and FiLM arms trained federatedly and scored by the same
code, the profile arms also with half of the values and with none; and the thinned profile copy it scores with."""

import json

import numpy as np
import pytest

from bench.common import BenchOptions
from bench.fusion import ARMS, PROFILE_VARIANTS, plan_for, run, thinned_profile
from preprocessing.profile import read_site_profile
from synthetic.hospitals import default_profiles, write_federation


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion")
    return out, json.loads(run(BenchOptions(out=out, tiny=True)).read_text())


def test_every_arm_and_missingness_variant_is_scored(tiny_run):
    out, data = tiny_run
    expected = {"image"} | {
        arm if v == "as exported" else f"{arm} / {v}" for arm in ARMS if arm != "image" for v in PROFILE_VARIANTS
    }
    assert set(data["arms"]) == expected
    for arm in data["arms"].values():
        assert [r["seed"] for r in arm["per_seed"]] == [0]
        assert set(arm["per_seed"][0]["sites"]) == {"site-0", "site-1"}
        for stats in arm["summary"].values():
            assert stats["mean"] is None or 0.0 <= stats["mean"] <= 1.0
    # only the profile distinguishes the profile-only arm's predictions: without it, it predicts one value for all
    assert data["arms"]["profile / no profile"]["per_seed"][0]["overall"]["test-c-index"] in (0.5, None)
    # each fused run pooled the normalisation and stored it in its bundle
    for arm, fusion in ARMS.items():
        meta = json.loads(
            (out / "work" / "fusion" / "runs" / f"{arm}-seed0" / "model" / "final" / "model.json").read_text()
        )
        assert meta["model"]["profile_fusion"] == fusion.partition("+")[0]
        assert ("profile_normalisation" in meta) == (fusion != "none")
    assert set(data["fused_minus_image_c_index"]) == set(ARMS) - {"image"}
    assert meta["provenance"]["run_config"]["profile-dropout"] == 0.3  # the last arm: late+dropout


def test_plans_grow_with_the_mode():
    tiny, quick = plan_for(BenchOptions(out=".", tiny=True)), plan_for(BenchOptions(out=".", quick=True))
    assert len(quick.seeds) >= 3 and quick.patients_per_site > tiny.patients_per_site


def test_thinned_profile_removes_about_half_the_values_and_keeps_every_row(tmp_path):
    write_federation(
        tmp_path / "fed",
        sites=1,
        patients_per_site=40,
        seed=1,
        profiles=[p.__class__(**{**p.__dict__, "rows": 16}) for p in default_profiles(1)],
    )
    site = tmp_path / "fed" / "site-0"
    before = read_site_profile(site)
    after = read_site_profile(thinned_profile(site, tmp_path / "thin", drop=0.5, seed=0))
    assert after.keys == before.keys and after.errors == ()
    kept = (~after.missing).sum() / (~before.missing).sum()
    assert 0.35 < kept < 0.65
    assert np.all(after.missing[before.missing])  # nothing missing comes back
    same = ~after.missing
    np.testing.assert_allclose(after.values[same], before.values[same])
