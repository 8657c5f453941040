"""``fedct status RUN_DIR``: where a federated run stands, read from its ``metrics.json``.

Prints the round table (the same columns the server prints while it runs), how many of the planned rounds are
done, the best round so far with its held-out test figures, and the latest round's validation figures per site.
Works on a finished run and on one still running (``metrics.json`` is rewritten after every round).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.json"


class StatusError(ValueError):
    """The run folder or its metrics.json cannot be read; the message names the file and why."""


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """The parsed ``RUN_DIR/metrics.json`` (StatusError when missing or not a fedct metrics file)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StatusError(f"run folder {run_dir} does not exist")
    path = run_dir / METRICS_NAME
    if not path.is_file():
        raise StatusError(f"{path} does not exist: no round has finished yet, or {run_dir} is not a fedct run folder")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StatusError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise StatusError(f"{path} has no 'rounds' list: not a metrics.json written by the fedct server")
    for i, entry in enumerate(data["rounds"]):
        if not isinstance(entry, dict) or "round" not in entry or "evaluate" not in entry or "train" not in entry:
            raise StatusError(f"{path}: rounds[{i}] lacks round/train/evaluate")
    return data


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _f(value: Any, width: int = 7) -> str:
    v = _num(value)
    return f"{v:>{width}.3f}" if math.isfinite(v) else f"{'-':>{width}}"


def _int(value: Any) -> str:
    v = _num(value)
    return str(int(v)) if math.isfinite(v) else "-"


def round_table(run_dir: Path, data: Mapping[str, Any]) -> list[str]:
    """Header and one line per round: the server's own table (fl_server.run_log.RunLog.header/row)."""
    from fl_server.run_log import RunLog

    best = (data.get("best_round") or {}).get("round")
    formatter = RunLog(run_dir, run_config={}, emit=lambda _line: None)  # only formats; writes nothing
    lines = [formatter.header()]
    for entry in data["rounds"]:
        clean = {**entry, "seconds": _num(entry.get("seconds")) if math.isfinite(_num(entry.get("seconds"))) else 0.0}
        lines.append(formatter.row(_nan_for_null(clean), entry["round"] == best))
    return lines


def _nan_for_null(value: Any) -> Any:
    """metrics.json writes undefined metrics as null; the table formatter expects NaN."""
    if value is None:
        return math.nan
    if isinstance(value, Mapping):
        return {k: _nan_for_null(v) for k, v in value.items()}
    return value


def status_lines(run_dir: Path, data: Mapping[str, Any]) -> list[str]:
    """The whole status report as lines of text."""
    rounds = data["rounds"]
    config = data.get("run_config") or {}
    planned = config.get("num-server-rounds")
    done = len(rounds)
    lines = [
        f"rounds: {done} done"
        + (f" of {planned} planned" if planned else "")
        + f"; started {data.get('started_utc', '?')} UTC"
    ]
    if config:
        lines.append(
            f"model {config.get('model-name', '?')}, {config.get('local-epochs', '?')} local epoch(s) per round, "
            f"strategy {config.get('strategy', 'fedavg')}"
        )
    if not rounds:
        lines.append("no round has finished yet")
        return lines
    lines.append("")
    lines += round_table(run_dir, data)
    latest = rounds[-1]
    sites = (latest.get("evaluate") or {}).get("sites") or {}
    lines += [
        "",
        f"latest round {latest['round']}, validation per site:",
        f"  {'site':12} {'val n':>6} {'macro AUC':>9} {'bal. acc':>8} {'C-index':>7} {'loss':>7} {'train s':>7}",
    ]
    train_sites = (latest.get("train") or {}).get("sites") or {}
    for site, m in sorted(sites.items()):
        t = train_sites.get(site, {})
        lines.append(
            f"  {site:12} {_int(m.get('val-n')):>6} {_f(m.get('val-auc-macro'), 9)} {_f(m.get('val-balanced-accuracy'), 8)} "
            f"{_f(m.get('val-c-index'), 7)} {_f(m.get('val-loss'), 7)} {_f(t.get('train-seconds'), 7)}"
        )
    best = data.get("best_round")
    if best:
        test = best.get("test") or {}
        lines += [
            "",
            f"best round {best['round']} (by {best.get('selected_by')} = {_f(best.get('value'), 0).strip()}); "
            f"held-out test: macro AUC {_f(test.get('test-auc-macro'), 0).strip()}, pooled AUC "
            f"{_f(test.get('test-pooled-auc-macro'), 0).strip()}, C-index {_f(test.get('test-c-index'), 0).strip()}, "
            f"accuracy {_f(test.get('test-accuracy'), 0).strip()} on {_int(test.get('test-n'))} studies",
        ]
    return lines


def run_status(args: argparse.Namespace, *, emit: Callable[[str], None] = print) -> int:
    """Handler of ``fedct status``: 0 when printed, 2 with a message when the run folder cannot be read."""
    try:
        data = load_metrics(Path(args.run_dir))
    except StatusError as exc:
        print(f"fedct status: error: {exc}", file=sys.stderr)
        return 2
    for line in status_lines(Path(args.run_dir), data):
        emit(line)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct status RUN_DIR``."""
    p = sub.add_parser(
        "status", help="print the round table and latest figures of a federated run (finished or running)"
    )
    p.add_argument("run_dir", help="run folder holding metrics.json")
    p.set_defaults(func=run_status)
