"""The main job: `fedct demo` end to end in a subprocess, and its options."""

import json
from pathlib import Path

import pytest
from federation import pids_matching
from test_cli import fedct

from fedct.demo import DemoOptions, server_config_for, simulation_backend_config


def test_demo_runs_end_to_end_and_leaves_no_process(tmp_path):
    before = set(pids_matching("raylet")) | set(pids_matching("gcs_server"))
    # 24 patients: every split holds >= 5 studies, the metrics floor k (README "Privacy options"), so validation
    # metrics leave the sites and a best round is chosen.
    done = fedct(
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--sites",
        "2",
        "--patients-per-site",
        "24",
        "--rounds",
        "1",
        "--model",
        "smallcnn",
        "--external-studies",
        "3",
        cwd=tmp_path,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for step in ("1/4", "2/4", "3/4", "4/4"):
        assert f"== {step}" in done.stdout
    assert "best round 1" in done.stdout
    out = tmp_path / "demo"
    assert json.loads((out / "metrics.json").read_text())["rounds"][0]["round"] == 1
    assert (out / "curves.png").is_file() and (out / "model" / "final" / "model.json").is_file()
    external = json.loads((out / "external.json").read_text())  # the external validation family, scored
    assert external["external-n"] == 3 and external["counts"] == {"covid": 1, "other_pneumonia": 1, "normal": 1}
    assert "external validation family (3 studies" in done.stdout
    left = (set(pids_matching("raylet")) | set(pids_matching("gcs_server"))) - before
    assert not left, f"Ray processes left behind: {left}"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sites": 1}, "at least 2 sites"),
        ({"patients_per_site": 2}, "patients-per-site"),
        ({"rounds": 0}, "rounds"),
        ({"external_studies": 2}, "external-studies"),
    ],
)
def test_demo_options_are_checked(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DemoOptions(out=Path("x"), **kwargs)


def test_demo_run_config_uses_every_site_and_an_absolute_run_dir(tmp_path):
    config = server_config_for(DemoOptions(out=tmp_path / "d", sites=4, rounds=2, model_name="smallcnn"))
    assert config.min_sites == 4 and config.num_server_rounds == 2 and config.model_name == "smallcnn"
    assert Path(config.run_dir).is_absolute()
    assert simulation_backend_config()["client_resources"]["num_cpus"] == 1


def test_simulated_sites_can_share_a_gpu_by_fraction():
    """#18.5: fractional num_gpus per simulated site (Ray); without a GPU the automatic share is 0."""
    import pytest
    import torch

    from fedct.demo import sim_gpus_per_site

    assert simulation_backend_config(gpus_per_site=0.25)["client_resources"]["num_gpus"] == 0.25
    assert simulation_backend_config()["client_resources"]["num_gpus"] == 0.0
    for bad in (-0.5, 1.5):
        with pytest.raises(ValueError, match="gpus-per-site"):
            simulation_backend_config(gpus_per_site=bad)
    assert sim_gpus_per_site(4) == (0.25 if torch.cuda.is_available() else 0.0)
    assert sim_gpus_per_site(4, 0.0) == 0.0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            sim_gpus_per_site(4, 0.5)
    with pytest.raises(ValueError, match="sites"):
        sim_gpus_per_site(0)


def test_demo_can_fuse_the_synthetic_profiles(tmp_path):
    config = server_config_for(DemoOptions(out=tmp_path / "d", model_name="smallcnn", profile_fusion="film"))
    assert config.profile_fusion == "film" and config.model.profile_variables == 16
    assert server_config_for(DemoOptions(out=tmp_path / "d")).profile_fusion == "none"
