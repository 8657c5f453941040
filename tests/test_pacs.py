"""preprocessing.pacs (settings, retries, store, pull) against a real Orthanc: DICOMweb and DIMSE pulls equal folder
ingestion, resume, refusals. The push side of the same connections: tests/test_push.py.

Orthanc runs on 127.0.0.1 (its ports listen on all interfaces; the config refuses non-local HTTP and unregistered
DIMSE peers, see tests/orthanc.py) and is stopped by PID. A request-counting proxy (a thread of this process)
stands between the site and Orthanc where a test needs to count WADO-RS requests or make the PACS fail.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from federation import TINY_RUN_CONFIG, tiny_federation
from orthanc import CLIENT_AET, SKIP_REASON, FaultyProxy, free_port, orthanc_available, start_orthanc, stop_orthanc

from fedct.cli import main
from preprocessing.deid import KEY_FILE_NAME
from preprocessing.ingest import MANIFEST_NAME, ingest_site, load_manifest
from preprocessing.pacs import (
    ENV_KEYS,
    InstanceStore,
    PacsError,
    PacsSettings,
    Query,
    SeriesRef,
    Transient,
    endpoint,
    pull,
    read_pacs_settings,
    with_retries,
)
from preprocessing.transforms import PipelineConfig
from preprocessing.volume import as_series, read_hu_volume

needs_orthanc = pytest.mark.skipif(not orthanc_available(), reason=SKIP_REASON)
USER, PASSWORD = "site-a", "s3cret-Pa55"
SPACING, SIZE = TINY_RUN_CONFIG["target-spacing-mm"], TINY_RUN_CONFIG["input-size"]
PIPELINE = PipelineConfig(
    target_spacing_mm=tuple(map(float, SPACING.split(","))), input_size=tuple(map(int, SIZE.split(",")))
)


def write_env(folder: Path, *, password: str = PASSWORD, **settings: object) -> Path:
    """A site env file with the test user's credentials (password in its own file); ``settings`` add or replace keys."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pacs.password").write_text(password + "\n")
    (folder / "pacs.password").chmod(0o600)
    values = {
        "FEDCT_SITE_NAME": "site-a",
        "FEDCT_PACS_USER": USER,
        "FEDCT_PACS_PASSWORD_FILE": "pacs.password",
        "FEDCT_PACS_AET": CLIENT_AET,
        "FEDCT_PACS_RETRIES": 2,
        "FEDCT_PACS_BACKOFF_S": 0.01,
        "FEDCT_PACS_TIMEOUT_S": 20,
        "FEDCT_PACS_ALLOW_PLAIN_HTTP": "yes",  # the test PACS (Orthanc on 127.0.0.1) speaks plain http
        **settings,
    }
    path = folder / "site.env"
    path.write_text("# site env file\n" + "".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def settings_for(url: str, **overrides: object) -> PacsSettings:
    values: dict = {
        "url": url,
        "user": USER,
        "password": PASSWORD,
        "calling_aet": CLIENT_AET,
        "retries": 2,
        "backoff_s": 0.01,
        "allow_plain_http": True,
    }
    return PacsSettings(**{**values, **overrides})


def volumes(site_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str, int | None]]:
    """study id -> (HU volume, affine, split, diagnosis) of a site's manifest."""
    manifest = load_manifest(site_dir, PIPELINE)
    out = {}
    for entry in manifest.studies:
        volume, affine = read_hu_volume(as_series(entry.series))
        out[entry.id] = (volume, affine, entry.split, entry.diagnosis)
    return out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc (basic auth) holding one tiny synthetic site, plus that site ingested from its folder."""
    if not orthanc_available():
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("pacs")
    tiny_federation(root / "fed", sites=1, patients_per_site=6)
    site = root / "fed" / "site-0"
    server = start_orthanc(root / "orthanc", user=(USER, PASSWORD), move_port=free_port())
    try:
        uploaded = server.upload_folder(site / "dicom")
        ingest_site(site / "dicom", root / "folder-site", labels_csv=site / "labels.csv", pipeline=PIPELINE, workers=1)
        yield {"server": server, "root": root, "site": site, "uploaded": uploaded, "folder_site": root / "folder-site"}
    finally:
        stop_orthanc(server)


@pytest.fixture(scope="module")
def pacs_site(pacs):
    """The same site ingested with ``fedct ingest --pacs`` over DICOMweb: (site folder, stdout + stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc, site_dir = ingest_from_pacs(
            pacs, "web-site", pacs["server"].dicomweb_url, write_env(pacs["root"] / "env-web")
        )
    assert rc == 0, err.getvalue()
    return site_dir, out.getvalue() + err.getvalue()


def ingest_from_pacs(pacs: dict, name: str, url: str, env: Path, *extra: str) -> tuple[int, Path]:
    """``fedct ingest --pacs URL`` into a new site folder that shares the folder site's key (same pseudonyms)."""
    site_dir = pacs["root"] / name
    site_dir.mkdir()
    shutil.copy2(pacs["folder_site"] / KEY_FILE_NAME, site_dir / KEY_FILE_NAME)
    rc = main(
        [
            "ingest",
            "--pacs",
            url,
            "--pacs-env",
            str(env),
            "--out",
            str(site_dir),
            "--labels",
            str(pacs["site"] / "labels.csv"),
            "--spacing",
            SPACING,
            "--input-size",
            SIZE,
            "--workers",
            "1",
            *extra,
        ]
    )
    return rc, site_dir


# --- settings (no PACS needed) -------------------------------------------------------------------------------------


def test_settings_come_from_the_env_file_with_the_password_in_its_own_file(tmp_path):
    env = write_env(
        tmp_path,
        FEDCT_PACS_URL="'https://pacs.example.org/dicom-web'  # quoted, with a comment",
        FEDCT_PACS_STUDY_DATE="20240101-",
        FEDCT_PACS_CA_FILE="ca.pem",
    )
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    settings = read_pacs_settings(env)
    assert (settings.url, settings.user, settings.password) == ("https://pacs.example.org/dicom-web", USER, PASSWORD)
    assert settings.study_date == "20240101-" and settings.ca_file == tmp_path / "ca.pem" and settings.modality == "CT"
    assert (settings.retries, settings.backoff_s, settings.calling_aet) == (2, 0.01, CLIENT_AET)
    assert PASSWORD not in repr(settings)  # never printed by accident
    assert (
        read_pacs_settings(env, url="dicom://PACS@10.0.0.5:104").url == "dicom://PACS@10.0.0.5:104"
    )  # --pacs URL wins
    assert all(key.startswith("FEDCT_PACS_") for key in ENV_KEYS)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("FEDCT_PACS_PASWORD=x", "line 10: unknown setting FEDCT_PACS_PASWORD"),
        ("FEDCT_PACS_STUDY_DATE=2024", "FEDCT_PACS_STUDY_DATE='2024' is not a date or range"),
        ("FEDCT_PACS_RETRIES=many", "line 6: FEDCT_PACS_RETRIES='many' is not a int"),
        ("FEDCT_PACS_AET=THIS-AE-TITLE-IS-TOO-LONG", "is not an AE title"),
        ("FEDCT_PACS_URL=ftp://pacs/", "use http(s)://host/dicom-web"),
        ("FEDCT_PACS_URL=dicom://pacs.example.org:104", "dicom://CALLED_AET@host:port"),
        ("FEDCT_PACS_CA_FILE=missing.pem", "FEDCT_PACS_CA_FILE"),
        ("no equals sign", "line 10: expected KEY=VALUE"),
        ("FEDCT_SITE_NAME=again", "line 10: FEDCT_SITE_NAME is set twice"),
        ("FEDCT_PACS_MODALITY=C T", "line 10: FEDCT_PACS_MODALITY has spaces"),
    ],
)
def test_bad_settings_name_the_env_file_and_line(tmp_path, line, message):
    key, _, value = line.partition("=")
    replaced = {key: value} if key in ("FEDCT_PACS_RETRIES", "FEDCT_PACS_AET") else {}
    env = write_env(tmp_path, **replaced)  # 9 lines; a new line under test is line 10
    url = "" if line.startswith("FEDCT_PACS_URL") else "FEDCT_PACS_URL=http://127.0.0.1:1/dicom-web\n"
    env.write_text(env.read_text() + ("" if replaced else line + "\n") + url)
    with pytest.raises(ValueError) as info:
        read_pacs_settings(env)
    assert message in str(info.value)


def test_credentials_are_refused_on_the_command_line_and_need_user_and_password(tmp_path, capsys):
    with pytest.raises(ValueError, match="must not contain credentials"):
        endpoint("http://site:pw@127.0.0.1:8042/dicom-web")
    rc = main(["ingest", "--pacs", "http://site:topsecret@127.0.0.1:8042/dicom-web", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "FEDCT_PACS_PASSWORD_FILE" in err and "topsecret" not in err
    assert not (tmp_path / "s").exists()  # refused before anything is written
    env = tmp_path / "site.env"
    env.write_text("FEDCT_PACS_URL=http://127.0.0.1:1/dicom-web\nFEDCT_PACS_USER=someone\n")
    with pytest.raises(ValueError, match="FEDCT_PACS_USER and FEDCT_PACS_PASSWORD_FILE go together"):
        read_pacs_settings(env)
    with pytest.raises(ValueError, match="no PACS URL"):
        read_pacs_settings(None)


def test_endpoint_parses_both_protocols():
    web = endpoint("https://pacs.example.org/dicom-web/")
    assert (web.kind, web.url, web.host, web.port) == (
        "dicomweb",
        "https://pacs.example.org/dicom-web",
        "pacs.example.org",
        443,
    )
    dimse = endpoint("dicom://ORTHANC@10.1.2.3:4242")
    assert (dimse.kind, dimse.called_aet, dimse.host, dimse.port) == ("dimse", "ORTHANC", "10.1.2.3", 4242)


def test_a_pacs_cannot_make_the_site_write_outside_its_folder(tmp_path):
    store = InstanceStore(tmp_path)
    with pytest.raises(PacsError, match="invalid UID"):
        store.path(SeriesRef("1.2.3", "../../etc"), "1.2.3.4")
    assert store.path(SeriesRef("1.2", "1.2.3"), "1.2.3.4") == tmp_path / "1.2" / "1.2.3" / "1.2.3.4.dcm"


def test_retries_back_off_exponentially_on_transient_errors_only(tmp_path):
    settings = settings_for("http://127.0.0.1:1/dicom-web", retries=3, backoff_s=0.5)
    waits: list[float] = []
    calls = iter([Transient("out of resources"), requests.ConnectionError("Connection refused"), "ok"])

    def flaky():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert with_retries(settings, "a search", flaky, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]
    forbidden = requests.HTTPError(response=requests.Response())
    forbidden.response.status_code = 403

    def refuse():
        raise forbidden

    with pytest.raises(PacsError, match=r"refused a search \(HTTP 403 forbidden\)"):
        with_retries(settings, "a search", refuse, sleep=waits.append)
    assert waits == [0.5, 1.0]  # a refusal is not retried


# --- against Orthanc --------------------------------------------------------------------------------------------


@needs_orthanc
def test_dicomweb_ingest_equals_folder_ingest(pacs, pacs_site):
    site_dir, output = pacs_site
    assert PASSWORD not in output and f"fetched {pacs['uploaded']}" in output
    pulled = sorted((site_dir / "pacs").rglob("*.dcm"))
    assert len(pulled) == pacs["uploaded"]
    folder, web = volumes(pacs["folder_site"]), volumes(site_dir)
    assert sorted(web) == sorted(folder) and len(web) >= 4
    for study_id, (volume, affine, split, diagnosis) in folder.items():
        assert np.array_equal(web[study_id][0], volume) and np.array_equal(web[study_id][1], affine)
        assert web[study_id][2:] == (split, diagnosis)
    report = json.loads((site_dir / "ingest_report.json").read_text())
    assert report["counts"]["rejected"] == 0


@needs_orthanc
def test_dimse_ingest_equals_folder_ingest(pacs, capsys):
    env = write_env(pacs["root"] / "env-dimse")
    rc, site_dir = ingest_from_pacs(pacs, "dimse-site", pacs["server"].dimse_url, env)
    assert rc == 0, capsys.readouterr().err
    assert len(list((site_dir / "pacs").rglob("*.dcm"))) == pacs["uploaded"]
    folder, dimse = volumes(pacs["folder_site"]), volumes(site_dir)
    assert sorted(dimse) == sorted(folder)
    for study_id, (volume, affine, split, diagnosis) in folder.items():
        assert np.array_equal(dimse[study_id][0], volume) and np.array_equal(dimse[study_id][1], affine)
        assert dimse[study_id][2:] == (split, diagnosis)


@needs_orthanc
def test_dimse_c_move_to_our_own_storage_scp(pacs, tmp_path):
    """For a PACS without C-GET: C-MOVE to this site's AE title, received by a storage SCP on FEDCT_PACS_MOVE_PORT."""
    import pydicom

    settings = settings_for(pacs["server"].dimse_url, move_port=pacs["server"].move_port)
    result = pull(settings, tmp_path / "moved")
    assert (result.instances, result.fetched) == (pacs["uploaded"], pacs["uploaded"])
    originals = {}
    for path in (pacs["site"] / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        originals[str(ds.SOPInstanceUID)] = ds
    for path in (tmp_path / "moved").rglob("*.dcm"):
        ds, original = pydicom.dcmread(path), originals[path.stem]
        assert ds.PixelData == original.PixelData and ds.ImagePositionPatient == original.ImagePositionPatient
        assert path.parent.name == original.SeriesInstanceUID and path.parent.parent.name == original.StudyInstanceUID
    assert pull(settings, tmp_path / "moved").fetched == 0


@needs_orthanc
def test_pull_is_streamed_to_disk_not_held_whole(pacs, series_writer, tmp_path):
    """A 15.7 MB series (120 slices of 256x256) is pulled with a Python heap peak well under its size.

    Measured in a fresh process: tracemalloc counts every thread's allocations, and threads that earlier tests of
    the suite leave running (HTTP servers, Flower, TensorBoard writers) would otherwise count as the pull's.
    """
    server = pacs["server"]
    big = series_writer(tmp_path / "big", n_slices=120, rows=256, cols=256)
    size = sum(p.stat().st_size for p in big.paths)
    server.upload_folder(big.folder)
    script = """
import json, sys, tracemalloc
from pathlib import Path
import dicomweb_client.api, pynetdicom.sop_class  # imported before tracing: module import is not what is measured
from preprocessing.pacs import PacsSettings, Query, pull
url, user, password, aet, dest, study = sys.argv[1:]
settings = PacsSettings(url=url, user=user, password=password, calling_aet=aet, retries=2, backoff_s=0.01,
                        allow_plain_http=True)
tracemalloc.start()
result = pull(settings, Path(dest), query=Query(study_uids=(study,)))
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "fetched": result.fetched, "bytes": result.bytes_written}))
"""
    try:
        for url in (server.dicomweb_url, server.dimse_url):
            done = subprocess.run(
                [sys.executable, "-c", script, url, USER, PASSWORD, CLIENT_AET, str(tmp_path / url[:5]), big.study_uid],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            assert measured["fetched"] == 120 and measured["bytes"] >= size
            peak = measured["peak"]
            assert peak < size / 3, f"{url}: peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB series"
    finally:
        study = server.rest("/tools/lookup", data=big.study_uid.encode(), method="POST")[0]["ID"]  # type: ignore[index]
        server.rest(f"/studies/{study}", method="DELETE")
    assert server.instance_count() == pacs["uploaded"]


@needs_orthanc
def test_query_by_labels_and_study_date(pacs, tmp_path):
    """Only the studies asked for: by StudyInstanceUID or AccessionNumber (labels file keys), or by study date."""
    import pydicom

    server = pacs["server"]
    first = next((pacs["site"] / "dicom").rglob("*.dcm"))
    header = pydicom.dcmread(first, stop_before_pixels=True)
    wanted, accession, day = str(header.StudyInstanceUID), str(header.AccessionNumber), str(header.StudyDate)
    assert accession
    for url in (server.dicomweb_url, server.dimse_url):
        for name, query in (("uid", Query(study_uids=(wanted,))), ("accession", Query(accession_numbers=(accession,)))):
            result = pull(settings_for(url), tmp_path / f"{url[:5]}-{name}", query=query)
            assert (result.studies, result.fetched) == (1, result.instances) and result.instances > 0
            assert [p.name for p in (tmp_path / f"{url[:5]}-{name}").iterdir()] == [wanted]
        dated = pull(settings_for(url), tmp_path / f"{url[:5]}-date", query=Query(study_date=f"{day}-{day}"))
        assert wanted in {p.name for p in (tmp_path / f"{url[:5]}-date").iterdir()} and dated.series >= 1
        none = pull(settings_for(url), tmp_path / f"{url[:5]}-none", query=Query(study_date="19000101-19000102"))
        assert (none.series, none.fetched) == (0, 0)


@needs_orthanc
def test_interrupted_pull_resumes_without_refetching(pacs, tmp_path):
    proxy = FaultyProxy(pacs["server"].dicomweb_url)
    try:
        dest = tmp_path / "pulled"
        proxy.wado_budget = 2  # the PACS goes down after two series
        with pytest.raises(PacsError) as info:
            pull(settings_for(proxy.url), dest)
        assert proxy.url in str(info.value) and "HTTP 503" in str(info.value) and "run again" in str(info.value)
        before = {p.name for p in dest.rglob("*.dcm")}
        assert 0 < len(before) < pacs["uploaded"] and not list(dest.rglob("*.part"))

        proxy.reset()
        result = pull(settings_for(proxy.url), dest)
        assert (result.instances, result.present, result.fetched) == (
            pacs["uploaded"],
            len(before),
            pacs["uploaded"] - len(before),
        )
        assert proxy.counts["wado"] == result.series - 2  # one streamed request per series that was missing
        assert before <= {p.name for p in dest.rglob("*.dcm")}

        # A series broken off in the middle: only its missing instances are requested, one by one.
        lost = sorted(dest.rglob("*.dcm"))[:3]
        for path in lost:
            path.unlink()
        proxy.reset()
        result = pull(settings_for(proxy.url), dest)
        assert (result.fetched, proxy.counts["wado"]) == (3, 3)
        assert all(p.is_file() for p in lost)

        proxy.reset()
        again = pull(settings_for(proxy.url), dest)
        assert (again.fetched, again.present, proxy.counts["wado"]) == (0, pacs["uploaded"], 0)
    finally:
        proxy.close()


@needs_orthanc
def test_transient_503_is_retried_and_the_pull_completes(pacs, tmp_path, caplog):
    proxy = FaultyProxy(pacs["server"].dicomweb_url)
    try:
        proxy.fail_first = 2
        with caplog.at_level(logging.WARNING, logger="preprocessing.pacs"):
            result = pull(settings_for(proxy.url, retries=3), tmp_path / "pulled")
        assert result.fetched == pacs["uploaded"] and proxy.failed == 2
        assert "retry 1 of 3" in caplog.text and "retry 2 of 3" in caplog.text
        assert PASSWORD not in caplog.text
    finally:
        proxy.close()


@needs_orthanc
@pytest.mark.parametrize(
    "failure", ["wrong-password", "unreachable", "http-503", "dimse-unreachable", "dimse-unknown-aet"]
)
def test_refusing_pacs_gives_a_clear_error_and_loses_nothing(pacs, pacs_site, failure, capsys):
    """A site already ingested from the PACS; the next ingest fails: clear message, manifest and files untouched."""
    site_dir, name = pacs_site[0], failure
    manifest = (site_dir / MANIFEST_NAME).read_bytes()
    files = {p: p.stat().st_mtime_ns for p in (site_dir / "pacs").rglob("*")}
    proxy = FaultyProxy(pacs["server"].dicomweb_url)
    proxy.fail_all = True
    settings: dict[str, object] = {}
    url, password = pacs["server"].dicomweb_url, PASSWORD
    if failure == "wrong-password":
        password = "not-the-password"
    elif failure == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/dicom-web"
    elif failure == "http-503":
        url = proxy.url
    elif failure == "dimse-unreachable":
        url = f"dicom://ORTHANC@127.0.0.1:{free_port()}"
    else:
        url, settings = pacs["server"].dimse_url, {"FEDCT_PACS_AET": "STRANGER"}
    env = write_env(pacs["root"] / f"env-bad-{name}", password=password, **settings)
    try:
        rc = main(
            [
                "ingest",
                "--pacs",
                url,
                "--pacs-env",
                str(env),
                "--out",
                str(site_dir),
                "--labels",
                str(pacs["site"] / "labels.csv"),
                "--spacing",
                SPACING,
                "--input-size",
                SIZE,
                "--workers",
                "1",
            ]
        )
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert rc == 2 and f"PACS {url}" in err and password not in err
    expected = {
        "wrong-password": ["HTTP 401", "FEDCT_PACS_USER and FEDCT_PACS_PASSWORD_FILE", str(env)],
        "unreachable": [
            "cannot reach",
            "connection refused",
            "check the URL, that the PACS is running",
            "after 3 attempt(s)",
        ],
        "http-503": ["HTTP 503", "after 3 attempt(s)", "failing or overloaded", "run again"],
        "dimse-unreachable": ["cannot reach", "no association", "check the host, port", "after 3 attempt(s)"],
        "dimse-unknown-aet": ["rejected", "FEDCT_PACS_AET (STRANGER) is registered at the PACS"],
    }[failure]
    for words in expected:
        assert words in err, err
    assert (site_dir / MANIFEST_NAME).read_bytes() == manifest
    assert {p: p.stat().st_mtime_ns for p in (site_dir / "pacs").rglob("*")} == files


# --- credentials stay safe (#17.6) ----------------------------------------------------------------------------------


def test_basic_auth_over_plain_http_is_refused_unless_explicitly_allowed(tmp_path):
    env = write_env(tmp_path, FEDCT_PACS_URL="http://pacs.example.org/dicom-web", FEDCT_PACS_ALLOW_PLAIN_HTTP="no")
    with pytest.raises(ValueError, match=r"plain http://.*FEDCT_PACS_ALLOW_PLAIN_HTTP=yes"):
        read_pacs_settings(env)
    with pytest.raises(ValueError, match="FEDCT_PACS_ALLOW_PLAIN_HTTP"):
        PacsSettings(url="http://pacs.example.org/dicom-web", user=USER, password=PASSWORD)
    allowed = read_pacs_settings(write_env(tmp_path / "b", FEDCT_PACS_URL="http://pacs.example.org/dicom-web"))
    assert allowed.allow_plain_http and allowed.user == USER
    https = read_pacs_settings(
        write_env(tmp_path / "c", FEDCT_PACS_URL="https://pacs.example.org/dicom-web", FEDCT_PACS_ALLOW_PLAIN_HTTP="no")
    )
    assert https.user == USER
    assert PacsSettings(url="http://pacs.example.org/dicom-web").user is None  # no credentials: nothing to expose
    with pytest.raises(ValueError, match="yes or no"):
        read_pacs_settings(
            write_env(tmp_path / "d", FEDCT_PACS_URL="http://x/dicom-web", FEDCT_PACS_ALLOW_PLAIN_HTTP="maybe")
        )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_password_file_others_may_read_is_refused(tmp_path, mode):
    env = write_env(tmp_path, FEDCT_PACS_URL="https://pacs.example.org/dicom-web")
    (tmp_path / "pacs.password").chmod(mode)
    with pytest.raises(
        ValueError, match=rf"pacs.password may be read by group or others \(mode {mode:04o}\).*chmod 600"
    ):
        read_pacs_settings(env)
    (tmp_path / "pacs.password").chmod(0o400)
    assert read_pacs_settings(env).password == PASSWORD


def test_the_c_move_storage_scp_listens_only_on_the_configured_interface():
    from preprocessing.pacs import DimseConnection

    port = free_port()
    source = DimseConnection(settings_for(f"dicom://PACS@127.0.0.1:{free_port()}", move_port=port))
    with source._storage_scp(["1.2.840.10008.5.1.4.1.1.2"]):
        assert source.listening == ("127.0.0.1", port)  # the default: not every interface of the host
    with pytest.raises(ValueError, match="FEDCT_PACS_LISTEN_ADDRESS='pacs-host'"):
        settings_for("dicom://PACS@127.0.0.1:104", move_port=port, listen_address="pacs-host")


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate (PEM files in ``folder``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fedct test CA"))
        .issuer_name(name("fedct test CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"fedct test {role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(2 if role == "server" else 3)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files[f"{role}-cert"] = folder / f"{role}.pem"
        files[f"{role}-key"] = folder / f"{role}.key"
        files[f"{role}-cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}-key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        files[f"{role}-key"].chmod(0o600)
    return files


def tls_server_context(files: dict[str, Path], *, require_client_cert: bool):
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca"]))
    context.load_cert_chain(str(files["server-cert"]), str(files["server-key"]))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return context


@pytest.fixture
def tls_find_scp(tmp_path):
    """A real pynetdicom Query/Retrieve (C-FIND) SCP on 127.0.0.1 that only speaks TLS and requires a client cert."""
    from pydicom import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    files = make_tls_files(tmp_path / "tls")

    def on_find(event):
        query = event.identifier
        match = Dataset()
        match.QueryRetrieveLevel = query.QueryRetrieveLevel
        match.StudyInstanceUID = "1.2.3.4"
        if query.QueryRetrieveLevel == "SERIES":
            match.SeriesInstanceUID, match.Modality = "1.2.3.4.5", "CT"
        yield 0xFF00, match

    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(FIND)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=tls_server_context(files, require_client_cert=True),
        evt_handlers=[(evt.EVT_C_FIND, on_find)],
    )
    yield f"dicom://TLSPACS@127.0.0.1:{port}", files
    server.shutdown()


def test_dimse_over_tls_with_a_verified_pacs_certificate(tls_find_scp, tmp_path):
    from preprocessing.pacs import DimseConnection, Query

    url, files = tls_find_scp
    env = write_env(
        tmp_path / "env",
        FEDCT_PACS_URL=url,
        FEDCT_PACS_TLS_CA=files["ca"],
        FEDCT_PACS_TLS_CERT=files["client-cert"],
        FEDCT_PACS_TLS_KEY=files["client-key"],
        FEDCT_PACS_USER="",
        FEDCT_PACS_PASSWORD_FILE="",
    )
    settings = read_pacs_settings(env)
    assert settings.tls_ca == files["ca"]
    refs = DimseConnection(settings).find_series(Query(modality="CT"))
    assert [(r.study_uid, r.series_uid) for r in refs] == [("1.2.3.4", "1.2.3.4.5")]


@pytest.mark.parametrize("case", ["plain", "wrong-ca", "no-client-cert"])
def test_dimse_tls_refuses_what_it_cannot_verify(tls_find_scp, tmp_path, case):
    from preprocessing.pacs import DimseConnection, Query, Unreachable

    url, files = tls_find_scp
    overrides = {
        "plain": {},
        "wrong-ca": {"tls_ca": make_tls_files(tmp_path / "other")["ca"]},
        "no-client-cert": {"tls_ca": files["ca"]},
    }[case]
    settings = settings_for(url, user=None, password=None, timeout_s=5, **overrides)
    with pytest.raises(Unreachable):
        DimseConnection(settings).find_series(Query(modality="CT"))


def test_tls_settings_are_checked_before_anything_connects(tmp_path):
    files = make_tls_files(tmp_path / "tls")
    with pytest.raises(ValueError, match="FEDCT_PACS_TLS_CERT and FEDCT_PACS_TLS_KEY go together"):
        settings_for("dicom://PACS@127.0.0.1:104", tls_ca=files["ca"], tls_cert=files["client-cert"])
    with pytest.raises(ValueError, match="FEDCT_PACS_TLS_CA is for DIMSE"):
        settings_for("https://pacs.example.org/dicom-web", tls_ca=files["ca"])
    with pytest.raises(ValueError, match="C-MOVE over TLS"):
        settings_for("dicom://PACS@127.0.0.1:104", tls_ca=files["ca"], move_port=11112)
    with pytest.raises(ValueError, match="FEDCT_PACS_TLS_CA: .*does not exist"):
        read_pacs_settings(
            write_env(tmp_path / "env", FEDCT_PACS_URL="dicom://PACS@127.0.0.1:104", FEDCT_PACS_TLS_CA="missing.pem")
        )
