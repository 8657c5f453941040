"""fedct status RUN_DIR: the round table and latest figures from a metrics.json written by the server's RunLog."""

import json

from fedct.cli import main
from fedct.status import load_metrics, status_lines
from fl_server.run_log import RunLog


def _run(run_dir, rounds: int, planned: int) -> None:
    log = RunLog(
        run_dir,
        run_config={"num-server-rounds": planned, "model-name": "smallcnn", "local-epochs": 2},
        emit=lambda _l: None,
    )
    for r in range(1, rounds + 1):
        log.site_train({"site-a": {"train-loss": 0.9, "train-seconds": 12.5, "num-examples": 5.0}})
        log.site_evaluate(
            {
                "site-a": {
                    "val-n": 3.0,
                    "val-auc-macro": 0.6 + 0.1 * r,
                    "val-loss": 0.8,
                    "test-n": 3.0,
                    "test-auc-macro": 0.7,
                    "test-c-index": 0.65,
                    "test-n-events": 2.0,
                    "val-n-events": 1.0,
                }
            }
        )
        log.end_round(r)


def test_status_prints_rounds_progress_best_round_and_sites(tmp_path, capsys):
    _run(tmp_path, rounds=2, planned=5)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rounds: 2 done of 5 planned" in out
    assert "model smallcnn, 2 local epoch(s)" in out
    table = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [line.split()[0] for line in table] == ["1", "2"]
    assert table[1].endswith("*"), "the best round is marked"
    assert "best round 2" in out and "macro AUC 0.700" in out and "C-index 0.650" in out
    assert "site-a" in out and "12.500" in out  # the latest round per site, with its training time


def test_status_of_a_run_without_rounds_yet(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": [], "run_config": {"num-server-rounds": 3}}))
    lines = status_lines(tmp_path, load_metrics(tmp_path))
    assert lines[0].startswith("rounds: 0 done of 3 planned") and "no round has finished yet" in lines


def test_missing_folder_or_metrics_is_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["status", str(tmp_path)]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err


def test_foreign_or_broken_metrics_file_is_refused(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{not json")
    assert main(["status", str(tmp_path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": [{"round": 1}]}))
    assert main(["status", str(tmp_path)]) == 2
    assert "rounds[0] lacks" in capsys.readouterr().err
