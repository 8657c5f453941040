"""The ClientApp in a real Flower simulation: what leaves a site is weights, numbers and the site name only.

A recording client mod (Flower's mechanism for wrapping handlers) stores every reply the sites send; the test
then scans them for every identifier the sites' DICOM files carry. The run uses ``evaluate-mode = "fused"`` for two
rounds, so both kinds of evaluation leave the sites: in round 2's training replies (ConfigRecord ``evaluate``) and in
the evaluate replies after the last round.
"""

import json
from pathlib import Path

import pydicom
import pytest
from flwr.simulation import run_simulation

from fedct.demo import simulation_backend_config
from federation import TINY_RUN_CONFIG, tiny_federation
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
        server_app=build_server_app({**TINY_RUN_CONFIG, "num-server-rounds": 2, "evaluate-mode": "fused",
                                             "run-dir": str(root / "run")}),
        client_app=build_client_app({"sim-data-root": str(root / "data"), "sim-work-root": str(root / "sites")},
                                    mods=[recording_mod(replies)]),  # fmt: skip
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )
    return root, sorted(replies.iterdir())


def _identifiers(data_root: Path) -> set[str]:
    found: set[str] = {str(data_root)}
    for path in sorted(data_root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate", "InstitutionName",
                        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):  # fmt: skip
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 6:
                found.add(value)
        found.add(path.name if len(path.name) > 8 else str(path.parent))
    return found


def test_every_reply_was_recorded(recorded_replies):
    _, files = recorded_replies
    kinds = sorted(f.name.split("-")[0] for f in files)
    assert kinds.count("train") == 4 and kinds.count("evaluate") == 2
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
        if f.name.startswith("evaluate") or any(line.startswith(evaluation) for line in lines):
            site = json.loads(next(line for line in lines if line.startswith(b"site=")).split(b"=", 1)[1])
            assert list(site) == ["name"] and site["name"] in ("site-0", "site-1")
            metrics = json.loads(next(line for line in lines if line.startswith(evaluation)).split(b"=", 1)[1])
            assert "val-n" in metrics and "num-examples" in metrics
            for key, value in metrics.items():
                if "-hist-" in key:  # aggregate score histograms: counts per probability bin, no study-level data
                    assert all(isinstance(c, int | float) and c >= 0 and float(c).is_integer() for c in value)
                else:
                    assert isinstance(value, int | float), key
