"""The `fedct` command as hospital IT and engineers run it: synth, ingest, demo (subprocesses, real files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest


def fedct(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fedct", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    done = fedct(
        "synth",
        "--out",
        str(out / "fed"),
        "--sites",
        "2",
        "--patients-per-site",
        "4",
        "--seed",
        "3",
        "--quiet",
        cwd=out,
    )
    assert done.returncode == 0, done.stderr
    assert "site-0:" in done.stdout and "site-1:" in done.stdout
    return out / "fed"


def test_synth_writes_dicom_with_correct_geometry(synth_dir):
    files = sorted((synth_dir / "site-0" / "dicom").rglob("*.dcm"))
    assert files
    series = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    for slices in series.values():
        z = sorted(float(s.ImagePositionPatient[2]) for s in slices)
        steps = {round(b - a, 3) for a, b in zip(z, z[1:])}
        assert steps == {round(float(slices[0].SliceThickness), 3)}
    labels = (synth_dir / "site-0" / "labels.csv").read_text().splitlines()
    assert labels[0].startswith("StudyInstanceUID,diagnosis")
    assert len(labels) - 1 == len({s[0].StudyInstanceUID for s in series.values()})


def test_ingest_reports_and_exits_zero_with_rejections(synth_dir, tmp_path):
    dicom = tmp_path / "dicom"
    import shutil

    shutil.copytree(synth_dir / "site-0" / "dicom", dicom)
    (dicom / "README.txt").write_text("exported by PACS")
    victim = sorted(dicom.rglob("*.dcm"))[5]
    victim.unlink()  # one missing slice: that series must be refused, the others accepted
    done = fedct(
        "ingest",
        "--input",
        str(dicom),
        "--out",
        str(tmp_path / "site"),
        "--labels",
        str(synth_dir / "site-0" / "labels.csv"),
        "--input-size",
        "32,32,24",
        "--spacing",
        "10,10,10",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "missing_slices: 1" in done.stdout and "not_dicom: 1" in done.stdout
    report = json.loads((tmp_path / "site" / "ingest_report.json").read_text())
    reasons = sorted(r["reason"] for r in report["rejected"])
    assert reasons == ["missing_slices", "not_dicom"]
    assert report["counts"]["accepted"] >= 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--input", "/nonexistent/dicom"], "does not exist"),
        (["--labels", "/nonexistent/labels.csv"], "labels file not found"),
        (["--input-size", "64,64"], "--input-size"),
        (["--out", "/proc/version/site"], "site"),  # output under a file: cannot be created
    ],
)
def test_ingest_usage_errors_exit_nonzero_with_a_clear_message(synth_dir, tmp_path, args, needle):
    base = {"--input": str(synth_dir / "site-0" / "dicom"), "--out": str(tmp_path / "site")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    done = fedct("ingest", *[x for kv in base.items() for x in kv], cwd=tmp_path)
    assert done.returncode == 2
    assert needle in done.stderr


def test_deid_writes_copies_without_identifiers(synth_dir, tmp_path):
    source = synth_dir / "site-1" / "dicom"
    done = fedct(
        "deid",
        "--input",
        str(source),
        "--out",
        str(tmp_path / "deid"),
        "--site-dir",
        str(tmp_path / "site"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    originals = sorted(source.rglob("*.dcm"))
    copies = sorted((tmp_path / "deid").rglob("*.dcm"))
    assert len(copies) == len(originals) and f"de-identified {len(originals)} file(s)" in done.stdout
    original = pydicom.dcmread(originals[0])
    secrets = [
        str(original.PatientName),
        original.PatientID,
        original.AccessionNumber,
        original.StudyInstanceUID,
        original.InstitutionName,
    ]
    for copy in copies[:20]:
        data = copy.read_bytes()
        assert not any(s.encode() in data for s in secrets)
        assert not any(s in str(copy) for s in secrets)
    ds = pydicom.dcmread(copies[0])
    assert ds.PatientIdentityRemoved == "YES"
    assert (tmp_path / "site" / "site.key").stat().st_mode & 0o777 == 0o600


def test_deid_refuses_output_inside_input(synth_dir, tmp_path):
    source = synth_dir / "site-1" / "dicom"
    done = fedct(
        "deid", "--input", str(source), "--out", str(source / "out"), "--site-dir", str(tmp_path / "site"), cwd=tmp_path
    )
    assert done.returncode == 2 and "fedct deid: error" in done.stderr
    assert not (source / "out").exists()


def test_demo_command_defaults_equal_the_demo_options():
    from dataclasses import fields

    from fedct.cli import build_parser
    from fedct.demo import DemoOptions

    args = build_parser().parse_args(["demo", "--out", "x"])
    for f in fields(DemoOptions):
        if f.name != "out":
            assert getattr(args, "model" if f.name == "model_name" else f.name) == f.default, f.name


def test_predict_writes_reports_and_refuses_a_broken_study(synth_dir, tmp_path):
    import shutil

    from models.bundle import write_bundle
    from models.factory import ModelConfig, build_model
    from preprocessing.transforms import PipelineConfig

    config = ModelConfig(name="smallcnn")
    write_bundle(
        tmp_path / "bundle",
        build_model(config).state_dict(),
        model=config,
        pipeline=PipelineConfig(input_size=(32, 32, 24), target_spacing_mm=(10.0, 10.0, 10.0)),
        provenance={},
    )
    studies = sorted(p for p in (synth_dir / "site-0" / "dicom").iterdir() if p.is_dir())[:2]
    for study in studies:
        shutil.copytree(study, tmp_path / "in" / study.name)
    broken = sorted((tmp_path / "in" / studies[1].name).rglob("*.dcm"))
    broken[len(broken) // 2].unlink()
    done = fedct(
        "predict",
        "--model",
        str(tmp_path / "bundle"),
        "--input",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 study(ies) predicted, 1 refused" in done.stdout and "missing_slices" in done.stdout
    (folder,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    prediction = json.loads((folder / "prediction.json").read_text())
    assert set(prediction["probabilities"]) == {"covid", "other_pneumonia", "normal"}
    assert (folder / "report.html").is_file() and (folder / "sr.dcm").is_file()
    assert pydicom.dcmread(folder / "sr.dcm").StudyInstanceUID == prediction["StudyInstanceUID"]


def test_commands_other_than_certificates_work_without_cryptography():
    """A compute-only machine (the GPU benchmark host) may lack cryptography: only `certs`/`site-key` need it."""
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def blocked(name, *a, **k):\n"
        "    if name.split('.')[0] == 'cryptography':\n"
        "        raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = blocked\n"
        "from fedct.cli import main\n"
        "try:\n"
        "    main(['bench', 'train-loop', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print('ok', 'cryptography' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok False")


def test_predict_research_copy_from_the_switch_or_the_site_env_file_and_never_pushed(tmp_path, series_writer, capsys):
    from test_inference_predict import make_bundle

    from fedct.cli import main

    series_writer(
        tmp_path / "in" / "s1", n_slices=10, rows=24, cols=24, pixel_spacing_mm=(8.0, 8.0), slice_spacing_mm=8.0
    )
    bundle = make_bundle(tmp_path / "bundle")
    env = tmp_path / "site.env"
    env.write_text("FEDCT_LOCAL_IDENTIFIERS=no\n")
    base = ["predict", "--model", str(bundle), "--input", str(tmp_path / "in"), "--device", "cpu"]
    # A research copy has no patient to file the results under: --push is refused before anything is read.
    for extra in (
        ["--no-local-identifiers", "--push", "http://pacs.local/dicom-web"],
        ["--pacs-env", str(env), "--push"],
    ):
        assert main([*base, "--out", str(tmp_path / "refused"), *extra]) == 2
        assert "research copy" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    env.write_text("FEDCT_LOCAL_IDENTIFIERS=perhaps\n")
    assert main([*base, "--out", str(tmp_path / "bad"), "--pacs-env", str(env)]) == 2
    assert "FEDCT_LOCAL_IDENTIFIERS='perhaps' must be yes or no" in capsys.readouterr().err
    env.write_text("FEDCT_LOCAL_IDENTIFIERS=no\n")
    for name, extra in (("switch", ["--no-local-identifiers"]), ("env", ["--pacs-env", str(env)]), ("default", [])):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0, capsys.readouterr().err
        (folder,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
        hidden = name != "default"
        assert json.loads((folder / "prediction.json").read_text())["local_identifiers"] == (
            "hidden" if hidden else "site-local"
        )
        assert (folder / "local_identity.json").is_file() is not hidden
