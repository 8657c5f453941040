"""The preprocessing settings (preprocessing/pipeline.py): validation, fingerprint, and no torch needed to read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing.pipeline import PIPELINE_VERSION, PipelineConfig


def test_defaults_and_fingerprint_are_stable_and_cover_the_version():
    a, b = PipelineConfig(), PipelineConfig()

    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    assert a.to_dict()["pipeline_version"] == PIPELINE_VERSION
    assert PipelineConfig(hu_max=500.0).fingerprint() != a.fingerprint()


def test_transforms_module_exports_the_same_class():
    from preprocessing import transforms

    assert transforms.PipelineConfig is PipelineConfig and transforms.PIPELINE_VERSION == PIPELINE_VERSION


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_spacing_mm": (5.0, 0.0, 5.0)}, "target_spacing_mm"),
        ({"input_size": (64, 64)}, "input_size"),
        ({"input_size": (4, 64, 64)}, "input_size"),
        ({"hu_min": 400.0, "hu_max": -1000.0}, "hu_min"),
        ({"body_threshold_hu": 900.0}, "body_threshold_hu"),
    ],
)
def test_bad_settings_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kwargs)


def test_reading_the_settings_does_not_import_torch():
    code = "import sys, json; import preprocessing.pipeline, preprocessing.ingest; print(json.dumps('torch' in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True
    )

    assert json.loads(done.stdout) is False
