"""``fedct models list|show|register|promote|rollback --registry DIR``: the coordinator's model registry
(:mod:`models.registry`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser"]


def _registry(args: argparse.Namespace):  # models.registry imported lazily
    from models.registry import ModelRegistry

    return ModelRegistry(Path(args.registry))


def _rule(args: argparse.Namespace):
    """The rule given on the command line (any of --metric/--margin/--min-gain), else None: the run's own."""
    from models.registry import PromotionRule, _rule_of

    if args.metric is None and args.margin is None and args.min_gain is None:
        return None
    registry = _registry(args)
    base = _rule_of(registry.stamp(registry.resolve(args.version)).get("lineage") or {})
    return PromotionRule(
        metric=args.metric if args.metric is not None else base.metric,
        margin=args.margin if args.margin is not None else base.margin,
        min_gain=args.min_gain if args.min_gain is not None else base.min_gain,
    )


def _list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    champion = registry.champion()
    versions = registry.versions()
    if not versions:
        print(f"{registry.root}: no versions registered")
        return 0
    print(f"{'version':<8} {'parent':<8} {'registered':<21} {'sites':<24} {'test metric (overall)':<28} status")
    for version in versions:
        stamp = registry.stamp(version)
        lineage = stamp.get("lineage") or {}
        agg = (lineage.get("metrics") or {}).get("aggregate") or {}
        metric = next(
            (
                (k, v)
                for k in ("test-auc-macro", "test-accuracy", "test-loss")
                if isinstance(v := agg.get(k), int | float)
            ),
            None,
        )
        shown = f"{metric[0]} {metric[1]:.3f}" if metric else "n/a"
        sites = ",".join(lineage.get("sites") or []) or "n/a"
        status = "champion" if version == champion else ""
        print(
            f"{version:<8} {lineage.get('parent') or '-'!s:<8} {stamp.get('registered_utc', ''):<21} {sites[:24]:<24} "
            f"{shown:<28} {status}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    info = _registry(args).show(args.version)
    status = "champion" if info["champion"] else "not the champion"
    print(f"{info['version']}: {status}; content hash {'OK' if info['hash_ok'] else 'DOES NOT MATCH'}")
    print(json.dumps(info, indent=2))
    return 0


def _register(args: argparse.Namespace) -> int:
    version = _registry(args).register(Path(args.bundle), who=args.who, why=args.reason or "")
    print(f"registered {args.bundle} as {version}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from models.registry import PromotionRefused

    try:
        decision = _registry(args).promote(
            args.version, reason=args.reason or "", who=args.who, rule=_rule(args), override=args.override
        )
    except PromotionRefused as exc:
        print(f"fedct models promote: {exc}", file=sys.stderr)
        return 1
    print(decision.summary())
    print(f"{decision.challenger} is the champion" + (" (override: the rule failed)" if not decision.passed else ""))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    champion = _registry(args).rollback(reason=args.reason or "", who=args.who, to=args.to)
    print(f"rolled back: {champion} is the champion")
    return 0


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (OSError, ValueError) as exc:  # RegistryError, BundleError are ValueErrors
            print(f"fedct models {args.models_command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct models`` and its subcommands."""
    p = sub.add_parser("models", help="coordinator: the model registry (versions, champion, promotion, rollback)")
    inner = p.add_subparsers(dest="models_command", required=True)

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        q = inner.add_parser(name, help=help_text)
        q.add_argument("--registry", required=True, help="registry folder (the run config's registry key)")
        q.set_defaults(func=_guarded(func))
        return q

    command("list", _list, "registered versions, their lineage and which is the champion")
    q = command("show", _show, "one version's record (lineage, hash check, events) as JSON")
    q.add_argument("version", help="a version (v0001 ...) or 'champion'")
    q = command("register", _register, "register a bundle folder by hand (runs with a registry register themselves)")
    q.add_argument("bundle", help="model bundle folder (model.pt + model.json)")
    q.add_argument("--who", help="who registers (default: the account name)")
    q.add_argument("--reason", help="why (logged)")
    q = command("promote", _promote, "make a version the champion if it passes the promotion rule")
    q.add_argument("version")
    q.add_argument("--who", help="who promotes (default: the account name)")
    q.add_argument("--reason", help="why (logged; required with --override)")
    q.add_argument("--override", action="store_true", help="promote although the rule fails (logged as an override)")
    q.add_argument("--metric", help="rule metric (test-*), default: the one the version's run was configured with")
    q.add_argument("--margin", type=float, help="per-site non-inferiority margin")
    q.add_argument("--min-gain", type=float, help="overall superiority: the least improvement")
    q = command("rollback", _rollback, "restore the previous champion")
    q.add_argument("--reason", required=True, help="why (logged)")
    q.add_argument("--who", help="who rolls back (default: the account name)")
    q.add_argument("--to", help="an earlier champion to go back to (default: the previous one)")
