"""fedct bench: the command line (one benchmark end to end through the installed entry point, and bad options)."""

import json

from bench.cli import BENCHMARKS
from fedct.cli import build_parser, main


def test_every_benchmark_and_all_are_commands():
    parser = build_parser()
    for name in [*BENCHMARKS, "all"]:
        args = parser.parse_args(["bench", name, "--quick", "--out", "x"])
        assert args.benchmark == name and args.quick


def test_bench_train_loop_tiny_writes_its_json(tmp_path, capsys):
    assert main(["bench", "train-loop", "--tiny", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "train_loop.json").read_text())["mode"] == "tiny"


def test_quick_and_tiny_together_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "scale", "--quick", "--tiny", "--out", str(tmp_path)]) == 2
    assert "exclusive" in capsys.readouterr().err


def test_resume_is_for_the_quality_benchmark_only(tmp_path, capsys):
    assert main(["bench", "preprocess", "--resume", "--out", str(tmp_path)]) == 2
    assert "--resume applies to the quality benchmark only" in capsys.readouterr().err
    assert not (tmp_path / "preprocess.json").exists()
    args = build_parser().parse_args(["bench", "quality", "--resume", "--out", "x"])
    assert args.resume and args.benchmark == "quality"
