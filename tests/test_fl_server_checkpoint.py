import json

import pytest


def _run_state(server_round, scale=1.0):
    import numpy as np

    from fl_server.checkpoint import RunState

    return RunState(
        server_round=server_round,
        global_arrays={"w": np.full((2, 3), scale, np.float32), "n": np.array(7, np.int64)},
        strategy_scalars={"eta": 0.01, "clipping_norm": None},
        strategy_arrays={"m_t": {"w": np.full((2, 3), 0.5 * scale), "n": np.array(0.25)}},
        run_log={"rounds": [{"round": server_round}], "best": None},
        run_config={"strategy": "fedadam"},
        extra={"sites": ["site-0"]},
    )


def test_run_state_round_trip_ignores_temporary_files_and_keeps_only_the_last_arrays(tmp_path):
    import numpy as np

    from fl_server.checkpoint import load_run_state, save_run_state

    assert load_run_state(tmp_path / "state") is None
    save_run_state(tmp_path / "state", _run_state(1))
    save_run_state(tmp_path / "state", _run_state(2, scale=2.0))
    (tmp_path / "state" / "state.json.tmp").write_text('{"round": 3, "arrays_file": "round-003.npz"')  # crash mid-write
    (tmp_path / "state" / "round-003.npz.tmp").write_bytes(b"PK half")
    loaded = load_run_state(tmp_path / "state")
    assert (
        loaded.server_round == 2
        and loaded.run_config == {"strategy": "fedadam"}
        and loaded.extra == {"sites": ["site-0"]}
    )
    assert loaded.global_arrays["w"].dtype == np.float32 and np.all(loaded.global_arrays["w"] == 2.0)
    assert loaded.global_arrays["n"].dtype == np.int64 and int(loaded.global_arrays["n"]) == 7
    assert np.all(loaded.strategy_arrays["m_t"]["w"] == 1.0) and float(loaded.strategy_arrays["m_t"]["n"]) == 0.25
    assert loaded.strategy_scalars == {"eta": 0.01, "clipping_norm": None}
    assert sorted(p.name for p in (tmp_path / "state").glob("*.npz")) == ["round-002.npz"]


def test_damaged_run_state_is_an_error_naming_the_file(tmp_path):
    from fl_server.checkpoint import load_run_state, save_run_state

    save_run_state(tmp_path / "state", _run_state(4))
    arrays = tmp_path / "state" / "round-004.npz"
    arrays.write_bytes(arrays.read_bytes()[:-10])
    with pytest.raises(ValueError, match="round-004.npz does not match the checksum"):
        load_run_state(tmp_path / "state")
    (tmp_path / "state" / "state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format 'other'"):
        load_run_state(tmp_path / "state")


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    from fedct.files import atomic_write_bytes

    atomic_write_bytes(tmp_path / "a" / "x.bin", b"1")
    atomic_write_bytes(tmp_path / "a" / "x.bin", b"22")
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"22" and [p.name for p in (tmp_path / "a").iterdir()] == [
        "x.bin"
    ]
