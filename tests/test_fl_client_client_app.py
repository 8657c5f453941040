"""The ClientApp in a real Flower simulation: what leaves a site is weights, numbers and the site name only.

A recording client mod (Flower's mechanism for wrapping handlers) stores every reply the sites send; the test
then scans them for every identifier the sites' DICOM files carry. The run uses ``evaluate-mode = "fused"`` for two
rounds, so both kinds of evaluation leave the sites: in round 2's training replies (ConfigRecord ``evaluate``) and in
the evaluate replies after the last round. It fuses the clinical profile (``profile-fusion = "film"``), so the
profile statistics reply before round 1 (aggregates above the privacy floor only) is among the recorded replies.
"""

import json
from pathlib import Path

import pydicom
import pytest
from federation import TINY_RUN_CONFIG, tiny_federation
from flwr.simulation import run_simulation

from fedct.demo import simulation_backend_config
from fl_client.client_app import build_client_app
from fl_server.server_app import build_server_app


def recording_mod(folder: Path):
    """A client mod that writes each reply's records (arrays as raw bytes) to ``folder``."""

    def mod(msg, context, call_next):
        import json
        import uuid

        reply = call_next(msg, context)
        parts = []
        for name, record in reply.content.items():
            if hasattr(record, "to_numpy_ndarrays"):
                parts.extend(array.data for array in record.values())
            else:
                parts.append(f"{name}={json.dumps(dict(record))}".encode())
        (folder / f"{msg.metadata.message_type}-{uuid.uuid4().hex}.bin").write_bytes(b"\n".join(parts))
        return reply

    return mod


@pytest.fixture(scope="module")
def recorded_replies(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    tiny_federation(root / "data", sites=2, patients_per_site=6, seed=7)
    replies = root / "replies"
    replies.mkdir()
    run_simulation(
        server_app=build_server_app(
            {
                **TINY_RUN_CONFIG,
                "num-server-rounds": 2,
                "evaluate-mode": "fused",
                "profile-fusion": "film",
                "run-dir": str(root / "run"),
            }
        ),
        client_app=build_client_app(
            {"sim-data-root": str(root / "data"), "sim-work-root": str(root / "sites")}, mods=[recording_mod(replies)]
        ),
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )
    return root, sorted(replies.iterdir())


def _ood_replies(files: list[Path]) -> list[Path]:
    """The replies to the out-of-distribution statistics requests (their metrics are all ``ood-*``)."""
    return [f for f in files if f.name.startswith("evaluate") and b'metrics={"ood-' in f.read_bytes()]


def _identifiers(data_root: Path) -> set[str]:
    found: set[str] = {str(data_root)}
    for path in sorted(data_root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "StudyDate",
            "InstitutionName",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 6:
                found.add(value)
        found.add(path.name if len(path.name) > 8 else str(path.parent))
    return found


def test_every_reply_was_recorded(recorded_replies):
    _, files = recorded_replies
    kinds = sorted(f.name.split("-")[0] for f in files)
    # 2 profile statistics replies before round 1, 2 evaluate replies after the last round, then 2 x 2 replies of
    # the out-of-distribution statistics (fl_server.ood: moments, distances)
    assert kinds.count("train") == 4 and kinds.count("evaluate") == 8
    assert len(_ood_replies(files)) == 4
    assert len(_profile_replies(files)) == 2
    fused = [f for f in files if f.name.startswith("train") and b"\nevaluate=" in f.read_bytes()]
    assert len(fused) == 2  # round 2's training replies carry round 1's evaluation


def test_no_identifier_date_uid_or_path_leaves_a_site(recorded_replies):
    root, files = recorded_replies
    identifiers = _identifiers(root / "data")
    assert any(v.startswith("SYNTH") for v in identifiers) and len(identifiers) > 50
    for f in files:
        payload = f.read_bytes()
        leaked = [v for v in identifiers if v.encode() in payload]
        assert not leaked, f"{f.name} carries {leaked[:5]}"


def test_replies_carry_only_numbers_and_the_site_name(recorded_replies):
    _, files = recorded_replies
    for f in files:
        text = f.read_bytes()
        lines = text.split(b"\n")
        evaluation = b"evaluate=" if f.name.startswith("train") else b"metrics="  # fused: evaluation in the train reply
        if f in _profile_replies(files):
            continue  # test_profile_statistics_replies_carry_only_aggregates_above_the_floor
        if f in _ood_replies(files):  # aggregates only: a count, per-feature sums, [studies, sum, sum of squares]
            metrics = json.loads(next(line for line in lines if line.startswith(b"metrics=")).split(b"=", 1)[1])
            assert set(metrics) in (
                {"ood-n", "ood-sum", "ood-sumsq"},
                {"ood-val-log-distance", "ood-train-log-distance"},
            )
            assert metrics.get("ood-n", 5) >= 5 and all(len(v) in (0, 3) for k, v in metrics.items() if "log" in k)
            continue
        if f.name.startswith("evaluate") or any(line.startswith(evaluation) for line in lines):
            site = json.loads(next(line for line in lines if line.startswith(b"site=")).split(b"=", 1)[1])
            assert list(site) == ["name"] and site["name"] in ("site-0", "site-1")
            metrics = json.loads(next(line for line in lines if line.startswith(evaluation)).split(b"=", 1)[1])
            assert "val-n" in metrics and "num-examples" in metrics
            for key, value in metrics.items():
                if "-hist-" in key:  # aggregate score histograms: counts per probability bin, no study-level data
                    assert all(isinstance(c, int | float) and c >= 0 and float(c).is_integer() for c in value)
                elif "-calib-" in key:  # summed validation NLL per temperature: sent only from >= k studies
                    assert key == "val-calib-nll" and (value == [] or metrics["val-n"] >= 5)
                    assert all(isinstance(c, int | float) and c >= 0 for c in value)
                else:
                    assert isinstance(value, int | float), key


# --- errors leave a site only as reason codes ---------------------------------------------------------------------

import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from federation import TINY_RUN_CONFIG as _TINY  # noqa: E402
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.app.message_type import MessageType  # noqa: E402

from fl_client.client_app import REASON_CODES, metrics_min_count, reason_code, reason_code_mod  # noqa: E402
from fl_client.config import SiteConfigError  # noqa: E402

PATIENT_FOLDER = "DOE^JOHN_MRN123456"
PHI = ("DOE", "JOHN", "MRN123456", PATIENT_FOLDER, "IM0001")


def _message() -> Message:
    return Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type=MessageType.TRAIN
    )


def _context(tmp_path: Path) -> Context:
    node = {"site-name": "site-a", "dicom-dir": str(tmp_path / "dicom"), "site-dir": str(tmp_path / "site")}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _raising(exc: BaseException):
    def handler(msg, context):
        raise exc

    return handler


class _LimitError(ValueError):  # what fl_client.config's SiteLimitError looks like to this mod
    code = "site_limit_exceeded"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (_LimitError(f"/data/{PATIENT_FOLDER}: 900 series > FEDCT_MAX_SERIES"), "site_limit_exceeded"),
        (MemoryError(f"cannot allocate for /data/{PATIENT_FOLDER}"), "out_of_memory"),
        (SiteConfigError(f"node config dicom-dir /data/{PATIENT_FOLDER} ..."), "site_config_invalid"),
        (KeyError(f"/data/{PATIENT_FOLDER}/IM0001"), "internal_error"),
    ],
)
def test_any_exception_reaches_flower_as_its_reason_code_only(tmp_path, task_identity, caplog, exc, code):
    with caplog.at_level(logging.ERROR, logger="fedct.client"):
        reply = reason_code_mod()(_message(), _context(tmp_path), _raising(exc))  # returns: Flower adds nothing
    text = reply.error.reason
    assert re.fullmatch(rf"{code} incident=[0-9a-f]{{8}}", text) and code in REASON_CODES
    assert reply.error.code == 2  # ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert PATIENT_FOLDER in caplog.text and text in caplog.text  # the full text stays in the site log
    log_file = (tmp_path / "site" / "errors.log").read_text()
    assert PATIENT_FOLDER in log_file and text in log_file


def test_an_exception_raised_in_preprocessing_is_ingest_failed():
    from preprocessing.ingest import input_fingerprint

    with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever ingestion raises for a missing folder
        input_fingerprint(Path(f"/nonexistent/{PATIENT_FOLDER}"), None, None, None)
    assert reason_code(raised.value) == "ingest_failed"


def test_an_error_reply_of_an_inner_mod_is_reduced_to_a_code(tmp_path, task_identity, caplog):
    def failing_mod(msg, context):
        return Message(Error(code=0, reason=f"clipping failed for {PATIENT_FOLDER}"), reply_to=msg)

    with caplog.at_level(logging.ERROR, logger="fedct.client"):
        reply = reason_code_mod()(_message(), _context(tmp_path), failing_mod)
    assert reply.has_error() and re.fullmatch(r"protocol_error incident=[0-9a-f]{8}", reply.error.reason)
    assert PATIENT_FOLDER in caplog.text


def test_metrics_floor_setting_is_the_largest_of_run_site_and_five():
    assert metrics_min_count({}, {}) == 5
    assert metrics_min_count({}, {"metrics-min-count": 3}) == 5  # a run cannot lower it
    assert metrics_min_count({"metrics-min-count": 12}, {"metrics-min-count": 8}) == 12  # the site raises it
    assert metrics_min_count({"metrics-min-count": "7"}, {"metrics-min-count": 9}) == 9
    with pytest.raises(SiteConfigError, match="node config metrics-min-count"):
        metrics_min_count({"metrics-min-count": "many"}, {})


@pytest.fixture(scope="module")
def patient_named_folder_run(tmp_path_factory):
    """A real simulation: site-1's DICOM export holds only a folder named after a patient with a dangling link."""
    root = tmp_path_factory.mktemp("errors")
    tiny_federation(root / "data", sites=2, patients_per_site=6, seed=3)
    dicom = root / "data" / "site-1" / "dicom"
    for child in sorted(dicom.iterdir()):
        import shutil

        shutil.rmtree(child)
    (dicom / PATIENT_FOLDER).mkdir()
    os.symlink(dicom / PATIENT_FOLDER / "gone.dcm", dicom / PATIENT_FOLDER / "IM0001")
    run_simulation(
        server_app=build_server_app({**_TINY, "num-server-rounds": 1, "run-dir": str(root / "run")}),
        client_app=build_client_app({"sim-data-root": str(root / "data"), "sim-work-root": str(root / "sites")}),
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )
    return root


def test_a_patient_named_folder_never_reaches_the_server_only_the_reason_code(patient_named_folder_run):
    root = patient_named_folder_run
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    rejected = [r for entry in metrics["rounds"] for r in entry.get("rejected_updates", [])]
    assert rejected, "site-1's failure is recorded by the server"
    # The whole reason the server got (fl_server.rounds prefixes "error reply (code N): " with Flower's error code):
    # the site's reason code and an incident id, nothing else.
    assert all(
        re.fullmatch(r"error reply \(code \d+\): (ingest_failed|no_training_data) incident=[0-9a-f]{8}", r["reason"])
        for r in rejected
    )
    server_text = " ".join(
        p.read_text(errors="replace") for p in (root / "run").rglob("*") if p.suffix in (".json", ".md", ".txt")
    )
    for value in (*PHI, str(root / "data"), str(root / "sites")):
        assert value not in server_text, value
    site_log = (root / "sites" / "site-1" / "errors.log").read_text()
    assert PATIENT_FOLDER in site_log and "IM0001" in site_log  # the full message stays at the site
    incident = re.search(r"incident=([0-9a-f]{8})", rejected[0]["reason"]).group(1)
    assert incident in site_log  # IT can match the server's record to the site's log


def _profile_replies(files: list[Path]) -> list[Path]:
    return [f for f in files if f.name.startswith("evaluate") and b'"profile-count"' in f.read_bytes()]


def test_profile_statistics_replies_carry_only_aggregates_above_the_floor(recorded_replies):
    """The profile statistics reply: the site name and four aggregates, in schema order; a variable measured in fewer
    than k = 5 studies is sent as count 0 with zero sums; no value of a single study, no key, no site column name."""
    from preprocessing.profile import read_schema, read_site_profile

    root, files = recorded_replies
    schema = read_schema()
    for f in _profile_replies(files):
        lines = f.read_bytes().split(b"\n")
        assert sorted(line.split(b"=", 1)[0] for line in lines) == [b"metrics", b"site"]
        site = json.loads(next(line for line in lines if line.startswith(b"site=")).split(b"=", 1)[1])
        metrics = json.loads(next(line for line in lines if line.startswith(b"metrics=")).split(b"=", 1)[1])
        assert sorted(metrics) == ["profile-count", "profile-n", "profile-sum", "profile-sumsq"]
        table = read_site_profile(root / "data" / site["name"])
        assert metrics["profile-n"] == len(table.keys) >= 5
        for j, name in enumerate(schema.names):
            present = table.values[~table.missing[:, j], j]
            count, total = metrics["profile-count"][j], metrics["profile-sum"][j]
            if len(present) < 5:
                assert count == 0 and total == 0 and metrics["profile-sumsq"][j] == 0, name
            else:
                assert count == len(present) and abs(total - float(present.sum())) <= 1e-6 * max(1.0, abs(total)), name
        mapping = (root / "data" / site["name"] / "profile-mapping.toml").read_text()
        columns = [
            line.split("=", 1)[1].strip().strip('"') for line in mapping.splitlines() if line.startswith("column =")
        ]
        payload = f.read_bytes()
        assert not [c for c in columns if len(c) >= 4 and c.encode() in payload]
