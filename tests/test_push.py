"""Push: preprocessing.pacs.push_files and inference.push (fedct predict --push) store the SR and Secondary Captures in a
real Orthanc (STOW-RS and C-STORE); one connection per PACS pulls and pushes."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from federation import tiny_federation
from orthanc import SKIP_REASON, FaultyProxy, free_port, orthanc_available, start_orthanc, stop_orthanc
from test_inference_predict import make_bundle
from test_pacs import PASSWORD, USER, settings_for, write_env

from fedct.cli import main
from inference.push import push_results, result_files
from preprocessing.pacs import (
    DicomWebConnection,
    DimseConnection,
    PacsError,
    Query,
    Refused,
    connect,
    pull,
    push_files,
    read_pacs_settings,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """``fedct predict --push`` of one synthetic study (real untrained bundle) to an Orthanc holding the source studies.

    Yields the Orthanc (stopped by PID afterwards), the command's output and the result files (OUT/<study>/sr.dcm, sc_NN.dcm).
    """
    if not orthanc_available():
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("push")
    tiny_federation(root / "fed", sites=1, patients_per_site=1)
    dicom = sorted((root / "fed" / "site-0" / "dicom").iterdir())[0]  # one study: predicting is the slow part
    bundle = make_bundle(root / "bundle", quantiles=(-1000.0, 1000.0))
    server = start_orthanc(root / "orthanc", user=(USER, PASSWORD))
    try:
        sources = server.upload_folder(dicom)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(
                [
                    "predict",
                    "--model",
                    str(bundle),
                    "--input",
                    str(dicom),
                    "--out",
                    str(root / "out"),
                    "--device",
                    "cpu",
                    "--push",
                    server.dicomweb_url,
                    "--pacs-env",
                    str(write_env(root / "env")),
                ]
            )
        assert rc == 0, err.getvalue()
        files = result_files(root / "out")
        yield {
            "root": root,
            "dicom": dicom,
            "bundle": bundle,
            "out": root / "out",
            "files": files,
            "server": server,
            "sources": sources,
            "output": out.getvalue() + err.getvalue(),
        }
    finally:
        stop_orthanc(server)


@pytest.fixture(scope="module")
def empty_orthanc(tmp_path_factory):
    if not orthanc_available():
        pytest.skip(SKIP_REASON)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), user=(USER, PASSWORD))
    yield server
    stop_orthanc(server)


@pytest.fixture
def orthanc(empty_orthanc):
    """An Orthanc with nothing stored (emptied before each test)."""
    empty_orthanc.clear()
    assert empty_orthanc.instance_count() == 0
    return empty_orthanc


def stored(server, study_uid: str) -> dict[str, str]:
    """SOPInstanceUID -> SOPClassUID of a study's instances in Orthanc, found with QIDO-RS."""
    client = DICOMwebClient(server.dicomweb_url, session=create_session_from_user_pass(USER, PASSWORD))
    found = client.search_for_instances(study_uid, fields=["SOPClassUID", "SOPInstanceUID"])
    return {item["00080018"]["Value"][0]: item["00080016"]["Value"][0] for item in found}


def expected(files: list[Path]) -> dict[str, dict[str, str]]:
    """study UID -> {SOPInstanceUID: SOPClassUID} of the result files."""
    out: dict[str, dict[str, str]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
    return out


def test_result_files_are_the_sr_and_secondary_captures(predicted, tmp_path):
    keys = sorted(p.name for p in predicted["out"].iterdir() if p.is_dir())
    files = result_files(predicted["out"], keys[:1])
    assert files and {p.parent.name for p in files} == {keys[0]}
    assert {p.name for p in files} >= {"sr.dcm", "sc_01.dcm"} and not [p for p in files if p.suffix != ".dcm"]
    assert {cls for uids in expected(predicted["files"]).values() for cls in uids.values()} == {SR_CLASS, SC_CLASS}


def test_predict_push_stores_results_in_the_source_study_over_stowrs(predicted):
    server, want = predicted["server"], expected(predicted["files"])
    n = sum(map(len, want.values()))
    assert f"pushed {n} DICOM result(s) of {len(want)} study(ies) to PACS {server.dicomweb_url}" in predicted["output"]
    assert PASSWORD not in predicted["output"]
    for study_uid, instances in want.items():
        found = stored(server, study_uid)
        assert set(instances.items()) <= set(found.items())  # SR and SC are filed with the source study ...
        assert len(found) > len(instances)  # ... next to its CT images
    assert server.instance_count() == predicted["sources"] + n
    # Deterministic UIDs: pushing again replaces, never duplicates.
    assert push_results(settings_for(server.dicomweb_url), predicted["out"]) == 0
    assert server.instance_count() == predicted["sources"] + n


def test_push_over_c_store(predicted, orthanc):
    result = push_files(settings_for(orthanc.dimse_url), predicted["files"])
    want = expected(predicted["files"])
    assert (result.studies, result.instances) == (len(want), len(predicted["files"]))
    for study_uid, instances in want.items():
        assert stored(orthanc, study_uid) == instances


def test_push_retries_a_transient_503(predicted, orthanc):
    proxy = FaultyProxy(orthanc.dicomweb_url)
    try:
        proxy.fail_first = 1
        result = push_files(settings_for(proxy.url, retries=2), predicted["files"])
        assert proxy.failed == 1 and proxy.counts["stow"] == result.studies
        assert orthanc.instance_count() == len(predicted["files"])
    finally:
        proxy.close()


@pytest.mark.parametrize("failure", ["wrong-password", "unreachable", "dimse-unknown-aet"])
def test_refused_push_names_the_pacs_and_keeps_the_results(predicted, orthanc, tmp_path, failure, capsys):
    out = tmp_path / "out"
    shutil.copytree(predicted["out"], out)
    url, password, settings = orthanc.dicomweb_url, PASSWORD, {}
    if failure == "wrong-password":
        password = "wrong"
    elif failure == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/dicom-web"
    else:
        url, settings = orthanc.dimse_url, {"FEDCT_PACS_AET": "STRANGER"}
    env = write_env(tmp_path / "env", password=password, **settings)
    rc = push_results(read_pacs_settings(env, url=url), out)  # what fedct predict --push runs after predicting
    err = capsys.readouterr().err
    assert rc == 2 and f"PACS {url}" in err and f"results are in {out}" in err and password not in err
    assert {"wrong-password": "HTTP 401", "unreachable": "cannot reach", "dimse-unknown-aet": "rejected"}[
        failure
    ] in err
    assert len(result_files(out)) == len(predicted["files"])
    assert orthanc.instance_count() == 0


def test_bad_push_settings_stop_predict_before_it_starts(predicted, tmp_path, capsys):
    env = tmp_path / "site.env"
    env.write_text("FEDCT_PACS_USER=site\n")  # no password file, no URL
    rc = main(
        [
            "predict",
            "--model",
            str(predicted["bundle"]),
            "--input",
            str(predicted["dicom"]),
            "--out",
            str(tmp_path / "out"),
            "--push",
            "--pacs-env",
            str(env),
        ]
    )
    assert rc == 2 and "no PACS URL" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(PacsError, match="cannot reach PACS dicom://ORTHANC@127.0.0.1"):
        push_files(settings_for(f"dicom://ORTHANC@127.0.0.1:{free_port()}", retries=0), predicted["files"])


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_one_connection_pushes_what_the_pull_then_retrieves(orthanc, series_writer, tmp_path, protocol):
    """The connection the pull uses also stores (STOW-RS / C-STORE): a CT series pushed comes back unchanged."""
    url = orthanc.dicomweb_url if protocol == "dicomweb" else orthanc.dimse_url
    settings = settings_for(url)
    pacs = connect(settings)
    assert isinstance(pacs, DicomWebConnection if protocol == "dicomweb" else DimseConnection)
    series = series_writer(tmp_path / "ct", n_slices=4)
    pacs.store(series.study_uid, series.paths)
    assert orthanc.instance_count() == 4
    assert [(r.study_uid, r.series_uid) for r in pacs.find_series(Query(study_uids=(series.study_uid,)))] == [
        (series.study_uid, series.series_uid)
    ]
    result = pull(settings, tmp_path / "pulled", query=Query(study_uids=(series.study_uid,)))
    assert (result.series, result.fetched, result.present) == (1, 4, 0)
    for path in series.paths:
        original = pydicom.dcmread(path)
        pulled = pydicom.dcmread(
            tmp_path / "pulled" / series.study_uid / series.series_uid / f"{original.SOPInstanceUID}.dcm"
        )
        assert pulled.PixelData == original.PixelData and pulled.ImagePositionPatient == original.ImagePositionPatient


def test_a_push_from_an_unregistered_ae_title_names_the_storage_right(orthanc, series_writer, tmp_path):
    series = series_writer(tmp_path / "ct", n_slices=2)
    with pytest.raises(Refused, match=r"FEDCT_PACS_AET \(STRANGER\) may store at the PACS from this host"):
        connect(settings_for(orthanc.dimse_url, calling_aet="STRANGER")).store(series.study_uid, series.paths)
    with pytest.raises(ValueError, match="not a DICOM result file"):
        push_files(settings_for(orthanc.dimse_url), [tmp_path / "ct"])  # a folder, not a file: refused before sending
    assert orthanc.instance_count() == 0
