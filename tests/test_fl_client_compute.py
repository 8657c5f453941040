"""fl_client.compute: a site's precision / loader / channels-last / GPU-augmentation settings, resolved per device."""

from __future__ import annotations

import pytest
import torch

from fl_client.compute import NODE_KEYS, ComputeOptionError, ComputeOptions, resolve_compute
from fl_client.config import SiteConfig, SiteConfigError

CPU = torch.device("cpu")


def test_cpu_defaults_are_todays_cpu_path():
    compute = resolve_compute(ComputeOptions(), CPU)
    assert compute.precision == "fp32" and compute.autocast_dtype is None and not compute.grad_scaler
    assert compute.loader_workers == 0 and not compute.persistent_workers and not compute.pin_memory
    assert not compute.channels_last and not compute.gpu_augment
    assert compute.summary()["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_defaults_are_the_fast_ones():
    compute = resolve_compute(ComputeOptions(), torch.device("cuda"))
    assert compute.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert compute.grad_scaler == (compute.precision == "fp16")
    assert compute.channels_last and compute.pin_memory and compute.gpu_augment
    assert compute.loader_workers >= 0 and compute.persistent_workers == (compute.loader_workers > 0)


def test_explicit_cpu_settings_are_honoured():
    compute = resolve_compute(ComputeOptions(precision="bf16", loader_workers=3, persistent_workers=False), CPU)
    assert compute.precision == "bf16" and compute.autocast_dtype == torch.bfloat16
    assert compute.loader_workers == 3 and not compute.persistent_workers
    assert resolve_compute(ComputeOptions(loader_workers=2), CPU).persistent_workers  # auto: on with workers


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (ComputeOptions(precision="fp16"), "fp16"),
        (ComputeOptions(gpu_augment=True), "gpu-augment"),
    ],
)
def test_settings_the_cpu_cannot_honour_are_refused(options, needle):
    with pytest.raises(ComputeOptionError, match=needle):
        resolve_compute(options, CPU)


def test_node_config_values_parse_and_round_trip():
    options = ComputeOptions.from_node_config(
        {
            "precision": "BF16",
            "loader-workers": "4",
            "pin-memory": "false",
            "persistent-workers": "yes",
            "channels-last": "auto",
            "gpu-augment": "0",
        }
    )
    assert options == ComputeOptions(
        precision="bf16",
        loader_workers=4,
        pin_memory=False,
        persistent_workers=True,
        channels_last=None,
        gpu_augment=False,
    )
    assert ComputeOptions.from_node_config(options.to_node_config()) == options
    assert ComputeOptions.from_node_config({}) == ComputeOptions()
    assert ComputeOptions.from_node_config({"loader-workers": 2}).loader_workers == 2  # Flower may pass an int


@pytest.mark.parametrize(
    ("node_config", "needle"),
    [
        ({"precision": "fp8"}, "precision 'fp8'"),
        ({"loader-workers": "many"}, "FEDCT_LOADER_WORKERS"),
        ({"loader-workers": "-1"}, "FEDCT_LOADER_WORKERS"),
        ({"loader-workers": "65"}, "0..64"),
        ({"pin-memory": "maybe"}, "FEDCT_PIN_MEMORY"),
        ({"channels-last": "2"}, "FEDCT_CHANNELS_LAST"),
        ({"loader-workers": "0", "persistent-workers": "true"}, "persistent-workers"),
    ],
)
def test_bad_values_name_the_setting(node_config, needle):
    with pytest.raises(ComputeOptionError, match=needle):
        ComputeOptions.from_node_config(node_config)


def test_site_config_reads_the_compute_settings_from_node_config(tmp_path):
    node = {
        "site-name": "a",
        "dicom-dir": str(tmp_path),
        "site-dir": str(tmp_path / "w"),
        "precision": "fp32",
        "loader-workers": "2",
    }
    site = SiteConfig.from_context(node, {})
    assert site.compute == ComputeOptions(precision="fp32", loader_workers=2)
    assert (
        SiteConfig.from_context({k: v for k, v in node.items() if k not in ("precision", "loader-workers")}, {}).compute
        == ComputeOptions()
    )
    with pytest.raises(SiteConfigError, match="FEDCT_PIN_MEMORY"):
        SiteConfig.from_context({**node, "pin-memory": "perhaps"}, {})


def test_every_setting_has_a_site_env_key():
    from fl_client.site_env import SITE_KEYS

    assert set(NODE_KEYS) == {
        "precision",
        "loader-workers",
        "pin-memory",
        "persistent-workers",
        "channels-last",
        "gpu-augment",
    }
    for env, meaning in NODE_KEYS.values():
        assert env.startswith("FEDCT_") and SITE_KEYS[env] == meaning
