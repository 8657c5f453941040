"""The coordinator's model registry: versioned bundles, their lineage, and which one is the champion.

A registry is a folder::

    versions/v0001/        a copy of a model bundle (models.bundle) plus registry.json: version, content hash, lineage
    versions/v0002/ ...
    log.jsonl              append-only events, one JSON object a line: register, decision, promote, rollback
                           (each with who, when (UTC) and why)

The champion is what the log says: the last ``promote`` pushes a version on the champion history, a ``rollback``
pops it and the previous champion is champion again. So there is exactly one champion (or none before the first
promotion), and the whole history can be replayed from the log.

A version's content hash (SHA-256 over ``model.pt`` and ``model.json``) is recorded when it is registered and checked
whenever the version is used (:meth:`ModelRegistry.bundle_path`); ``model_card.md`` is not hashed: the registry
appends its section (version, lineage, promotion decisions with their numbers) to it.

Promotion (:class:`PromotionRule`, :func:`decide`): the challenger must be non-inferior on every site (its test metric
no worse than the champion's by more than ``margin``) and better overall (the test-count-weighted mean over the sites
by more than ``min_gain``). The numbers are, in order of preference, those of one federated evaluation of both models
on every site's test split in the challenger's run (``lineage["champion_comparison"]``, written by
``fl_server.campaign``), else the test metrics each run recorded (other runs: the splits may differ; the decision
says so). A promotion that fails the rule needs an explicit override with a reason, and is logged as such.

Plain Python and torch (no flwr): the server registers at the end of a run, ``fedct models`` reads and promotes.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedct.files import atomic_write_bytes, json_safe

__all__ = [
    "HASHED_FILES",
    "LOG_NAME",
    "STAMP_NAME",
    "Decision",
    "ModelRegistry",
    "PromotionRefused",
    "PromotionRule",
    "RegistryError",
    "bundle_content_hash",
    "decide",
    "lineage_from_bundle",
    "read_stamp",
]

LOG_NAME = "log.jsonl"
VERSIONS_DIR = "versions"
#: The registry's record inside each version's folder (not hashed).
STAMP_NAME = "registry.json"
#: What the content hash covers: the weights and the metadata load_bundle reads.
HASHED_FILES = ("model.pt", "model.json")
VERSION_PATTERN = re.compile(r"v\d{4,}")
#: Metrics where a lower value is better (the suffix after the split prefix).
LOWER_IS_BETTER = ("loss", "brier", "ece")


class RegistryError(ValueError):
    """The registry cannot do what was asked: unknown version, a hash that no longer matches, a bad log line.
    The message names the registry, the version and the reason."""


class PromotionRefused(RegistryError):
    """A promotion that does not pass the promotion rule and was not overridden; ``decision`` holds the numbers."""

    def __init__(self, message: str, decision: Decision) -> None:
        super().__init__(message)
        self.decision = decision


# --- content hash and stamp -------------------------------------------------------------------------------------


def bundle_content_hash(folder: Path) -> str:
    """SHA-256 over the names and bytes of a bundle's ``model.pt`` and ``model.json`` (hex)."""
    digest = hashlib.sha256()
    for name in HASHED_FILES:
        path = Path(folder) / name
        if not path.is_file():
            raise RegistryError(f"{folder}: not a model bundle (no {name})")
        digest.update(name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def read_stamp(folder: Path, *, verify: bool = True) -> dict[str, Any] | None:
    """A bundle's registry record (``registry.json``: version, content hash, lineage), or None for a bundle that was
    never registered. ``verify``: the content hash must still match (RegistryError naming both hashes otherwise)."""
    path = Path(folder) / STAMP_NAME
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(stamp, dict) or not VERSION_PATTERN.fullmatch(str(stamp.get("version", ""))):
        raise RegistryError(f"{path}: not a registry record (no version)")
    if verify:
        actual = bundle_content_hash(folder)
        if actual != stamp.get("content_sha256"):
            raise RegistryError(
                f"{folder}: registry version {stamp['version']} was registered with content hash "
                f"{stamp.get('content_sha256')}, the files now hash to {actual}: the bundle was changed "
                "after registration; do not use it"
            )
    return stamp


def lineage_from_bundle(
    meta: Mapping[str, Any],
    *,
    parent: str | None = None,
    run_dir: str | None = None,
    champion_comparison: Mapping[str, Any] | None = None,
    campaign_counts: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The lineage of a bundle from its ``model.json``: parent version, run config, strategy, rounds, participating
    sites (by name), per-site study counts (aggregate numbers only), pipeline version, test/validation metrics per
    site, calibration temperature; ``champion_comparison``: the champion's metrics from the same federated
    evaluation (``fl_server.campaign``); ``campaign_counts``: per site, the studies new since its previous campaign
    and the clinician-feedback labels used / conflicting (``train-new-studies``, ``train-feedback-labels``,
    ``train-feedback-conflicts``: aggregate counts under the sites' privacy floor)."""
    prov = meta.get("provenance") or {}
    metrics = prov.get("metrics") or {}
    sites = metrics.get("sites") or {}
    counts = {split: {s: m.get(f"{split}-n") for s, m in sorted(sites.items())} for split in ("val", "test")}
    calibration = meta.get("calibration") or {}
    return {
        "parent": parent,
        "run_dir": run_dir,
        "run_config": prov.get("run_config"),
        "strategy": prov.get("strategy"),
        "rounds_planned": prov.get("rounds_planned"),
        "round_of_weights": prov.get("round_of_weights"),
        "sites": list(prov.get("sites") or []),
        "studies": {
            "training": dict(metrics.get("training_studies") or {}),
            "validation": counts["val"],
            "test": counts["test"],
        },
        "new_studies": {site: dict(c).get("train-new-studies") for site, c in (campaign_counts or {}).items()},
        "feedback_labels": {
            site: {"used": dict(c).get("train-feedback-labels"), "conflicts": dict(c).get("train-feedback-conflicts")}
            for site, c in (campaign_counts or {}).items()
        },
        "model": meta.get("model"),
        "pipeline_version": (meta.get("pipeline") or {}).get("pipeline_version"),
        "pipeline": meta.get("pipeline"),
        "metrics": {"aggregate": dict(metrics.get("aggregate") or {}), "sites": {s: dict(m) for s, m in sites.items()}},
        "calibration_temperature": calibration.get("temperature"),
        "privacy": prov.get("privacy"),
        "champion_comparison": dict(champion_comparison) if champion_comparison else None,
    }


# --- the promotion rule -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromotionRule:
    """When a challenger replaces the champion.

    ``metric``: a held-out test metric the sites report (``test-*``; lower is better for loss, Brier score and ECE,
    higher for the others). ``margin``: per-site non-inferiority (the challenger may be worse than the champion on a
    site by at most this much). ``min_gain``: overall superiority (the challenger's test-count-weighted mean over the
    sites must be better by more than this). A site where either model has no value (undefined, or below the privacy
    floor) fails the rule: non-inferiority is not shown there.
    """

    metric: str = "test-auc-macro"
    margin: float = 0.02
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        if not self.metric.startswith("test-") or len(self.metric) <= len("test-"):
            raise ValueError(f"promotion metric must be a held-out test metric (test-*), got {self.metric!r}")
        for key, value in (("promotion margin", self.margin), ("promotion min-gain", self.min_gain)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")

    @property
    def lower_is_better(self) -> bool:
        """True for metrics where smaller is better (loss, Brier score, ECE)."""
        return self.metric.endswith(LOWER_IS_BETTER)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "direction": "lower is better" if self.lower_is_better else "higher is better"}


@dataclass(frozen=True)
class Decision:
    """The outcome of the promotion rule for one challenger against one champion, with its numbers."""

    challenger: str
    champion: str | None
    passed: bool
    rule: dict[str, Any]
    #: Where the numbers come from (one federated evaluation of both, the runs' recorded metrics, or no champion).
    source: str
    #: ``{site: {"challenger", "champion", "difference", "passed", "weight"}}`` (difference: better is positive).
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``{"challenger", "champion", "difference", "passed"}``: the test-count-weighted means over the sites.
    overall: dict[str, Any] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return json_safe({**asdict(self), "reasons": list(self.reasons)})

    def summary(self) -> str:
        """One line: passed or not, the overall numbers and the reasons."""
        head = f"{self.challenger} vs champion {self.champion or '(none)'}: {'PASSES' if self.passed else 'FAILS'} the rule"
        o = self.overall
        if o:
            head += (
                f" ({self.rule['metric']} overall {_fmt(o.get('challenger'))} vs {_fmt(o.get('champion'))}, "
                f"margin {self.rule['margin']:g}, min gain {self.rule['min_gain']:g})"
            )
        return head + ("; " + "; ".join(self.reasons) if self.reasons else "")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def decide(
    rule: PromotionRule,
    *,
    challenger: str,
    champion: str | None,
    challenger_sites: Mapping[str, Mapping[str, Any]],
    champion_sites: Mapping[str, Mapping[str, Any]],
    source: str,
) -> Decision:
    """Apply ``rule`` to per-site test metrics (``{site: {metric: value, "test-n": n}}``) of both models.

    Every site either model was evaluated on is checked: both must have a value, and the challenger must be no worse
    than ``margin``. Overall: the means weighted by each site's test count (the challenger's, else 1) over the sites
    both have values for; the challenger must be better by more than ``min_gain``.
    """
    sign = -1.0 if rule.lower_is_better else 1.0
    if champion is None:
        return Decision(
            challenger=challenger,
            champion=None,
            passed=True,
            rule=rule.to_dict(),
            source=source,
            reasons=("no champion yet: the first promotion needs no comparison",),
        )
    sites: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    totals = [0.0, 0.0, 0.0]  # weight, weighted challenger, weighted champion
    for site in sorted(set(challenger_sites) | set(champion_sites)):
        new = _number((challenger_sites.get(site) or {}).get(rule.metric))
        old = _number((champion_sites.get(site) or {}).get(rule.metric))
        weight = (
            _number((challenger_sites.get(site) or {}).get("test-n"))
            or _number((champion_sites.get(site) or {}).get("test-n"))
            or 1.0
        )
        entry: dict[str, Any] = {"challenger": new, "champion": old, "weight": weight}
        if new is None or old is None:
            entry.update(difference=None, passed=False)
            missing = " and ".join(w for w, v in (("challenger", new), ("champion", old)) if v is None)
            reasons.append(f"site {site}: no {rule.metric} for the {missing} (undefined or below the privacy floor)")
        else:
            difference = sign * (new - old)
            entry.update(difference=difference, passed=difference >= -rule.margin)
            if not entry["passed"]:
                reasons.append(
                    f"site {site}: {rule.metric} {_fmt(new)} vs champion {_fmt(old)}, worse by more than the "
                    f"margin {rule.margin:g}"
                )
            totals[0] += weight
            totals[1] += weight * new
            totals[2] += weight * old
        sites[site] = entry
    overall: dict[str, Any] = {}
    if totals[0] > 0:
        new, old = totals[1] / totals[0], totals[2] / totals[0]
        difference = sign * (new - old)
        overall = {"challenger": new, "champion": old, "difference": difference, "passed": difference > rule.min_gain}
        if not overall["passed"]:
            reasons.append(
                f"overall {rule.metric} {_fmt(new)} vs champion {_fmt(old)}: not better by more than {rule.min_gain:g}"
            )
    else:
        reasons.append(f"no site has {rule.metric} for both models: superiority cannot be shown")
    passed = bool(sites) and all(e["passed"] for e in sites.values()) and bool(overall.get("passed"))
    return Decision(
        challenger=challenger,
        champion=champion,
        passed=passed,
        rule=rule.to_dict(),
        source=source,
        sites=sites,
        overall=overall,
        reasons=tuple(reasons),
    )


# --- the registry -----------------------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_who() -> str:
    """The operator's account name (for the log's ``who``), ``unknown`` when there is none."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class ModelRegistry:
    """A registry folder (see the module doc). Writers take an exclusive lock on ``.lock``, so two runs finishing
    at once get distinct versions and the log's lines never interleave."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    # -- reading -------------------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    def events(self) -> list[dict[str, Any]]:
        """Every event of the log, oldest first (a line that is not a JSON object is a RegistryError naming it)."""
        if not self.log_path.is_file():
            return []
        out = []
        for number, line in enumerate(self.log_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise RegistryError(f"{self.log_path}:{number}: not a JSON line ({exc})") from None
            if not isinstance(event, dict) or "event" not in event:
                raise RegistryError(f"{self.log_path}:{number}: not a registry event")
            out.append(event)
        return out

    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        return [e["version"] for e in self.events() if e["event"] == "register"]

    def champion_history(self) -> list[str]:
        """The champion stack: promotions push, rollbacks pop; the last entry is the champion."""
        stack: list[str] = []
        for event in self.events():
            if event["event"] == "promote":
                stack.append(event["version"])
            elif event["event"] == "rollback":
                while stack and stack[-1] != event["version"]:
                    stack.pop()
        return stack

    def champion(self) -> str | None:
        """The current champion, None before the first promotion."""
        history = self.champion_history()
        return history[-1] if history else None

    def folder(self, version: str) -> Path:
        """The folder of a registered version (RegistryError naming the known versions otherwise)."""
        if version not in self.versions():
            known = ", ".join(self.versions()) or "none"
            raise RegistryError(f"registry {self.root}: no version {version!r} (registered: {known})")
        return self.root / VERSIONS_DIR / version

    def resolve(self, name: str) -> str:
        """A version name, or ``champion`` for the current champion."""
        if name == "champion":
            champion = self.champion()
            if champion is None:
                raise RegistryError(f"registry {self.root}: no champion yet (promote a version first)")
            return champion
        self.folder(name)
        return name

    def bundle_path(self, name: str) -> Path:
        """The bundle folder of a version (or ``champion``), its content hash checked."""
        folder = self.folder(self.resolve(name))
        read_stamp(folder, verify=True)
        return folder

    def package(self, name: str = "champion") -> tuple[str, str, dict[str, bytes]]:
        """``(version, content SHA-256, {file name: bytes})`` of a version (default: the champion) for sending to the
        sites: ``model.pt``, ``model.json`` and ``registry.json`` (content hash checked first)."""
        folder = self.bundle_path(name)
        stamp = self.stamp(folder.name)
        files = {n: (folder / n).read_bytes() for n in (*HASHED_FILES, STAMP_NAME)}
        return folder.name, str(stamp["content_sha256"]), files

    def stamp(self, version: str) -> dict[str, Any]:
        """The version's registry record (content hash not checked; :meth:`bundle_path` checks it)."""
        stamp = read_stamp(self.folder(version), verify=False)
        if stamp is None:
            raise RegistryError(f"registry {self.root}: version {version} has no {STAMP_NAME}")
        return stamp

    def show(self, name: str) -> dict[str, Any]:
        """Everything about a version: its record, whether its hash still matches, champion or not, its events."""
        version = self.resolve(name)
        stamp = self.stamp(version)
        try:
            read_stamp(self.folder(version), verify=True)
            intact = True
        except RegistryError:
            intact = False
        events = [e for e in self.events() if e.get("version") == version or e.get("challenger") == version]
        return {**stamp, "hash_ok": intact, "champion": self.champion() == version, "events": events}

    # -- writing -------------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _append(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Append one event (with ``utc``) to the log and fsync it (callers hold the lock)."""
        entry = {"event": event["event"], "utc": _now(), **{k: v for k, v in event.items() if k != "event"}}
        line = json.dumps(json_safe(entry), sort_keys=False, allow_nan=False) + "\n"
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def register(
        self, bundle: Path, *, lineage: Mapping[str, Any] | None = None, who: str | None = None, why: str = ""
    ) -> str:
        """Copy ``bundle`` into the registry as the next version (``v0001``, ``v0002`` ...); return the version.

        The bundle must load (``models.bundle.load_bundle``: format, pipeline version, architecture, weights).
        ``lineage`` defaults to :func:`lineage_from_bundle` of its ``model.json``; a ``parent`` in it must be a
        registered version.
        """
        from models.bundle import load_bundle  # torch only when a bundle is registered

        bundle = Path(bundle)
        _, meta = load_bundle(bundle)
        lineage = dict(lineage) if lineage is not None else lineage_from_bundle(meta)
        with self._locked():
            parent = lineage.get("parent")
            if parent is not None and parent not in self.versions():
                raise RegistryError(f"registry {self.root}: parent version {parent!r} is not registered")
            taken = set(self.versions())
            folder_root = self.root / VERSIONS_DIR
            if folder_root.is_dir():
                taken.update(p.name for p in folder_root.iterdir())
            number = 1 + max((int(v[1:]) for v in taken if VERSION_PATTERN.fullmatch(v)), default=0)
            version = f"v{number:04d}"
            tmp = folder_root / f".{version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(bundle, tmp, ignore=shutil.ignore_patterns(STAMP_NAME, ".*.tmp"))
            digest = bundle_content_hash(tmp)
            stamp = {"version": version, "content_sha256": digest, "registered_utc": _now(), "lineage": lineage}
            atomic_write_bytes(tmp / STAMP_NAME, json.dumps(json_safe(stamp), indent=2, allow_nan=False).encode())
            tmp.rename(folder_root / version)
            self._append(
                {
                    "event": "register",
                    "version": version,
                    "content_sha256": digest,
                    "parent": parent,
                    "who": who or default_who(),
                    "why": why or f"registered from {bundle}",
                }
            )
        self._write_card(version)
        return version

    def decision(self, name: str, rule: PromotionRule | None = None) -> Decision:
        """The promotion rule for version ``name`` against the current champion (nothing logged).

        ``rule``: by default the one the challenger's run was configured with (``promotion-*`` keys), else the
        defaults of :class:`PromotionRule`.
        """
        version = self.resolve(name)
        champion = self.champion()
        if champion == version:
            raise RegistryError(f"registry {self.root}: {version} is already the champion")
        lineage = self.stamp(version).get("lineage") or {}
        rule = rule or _rule_of(lineage)
        mine = (lineage.get("metrics") or {}).get("sites") or {}
        if champion is None:
            return decide(
                rule, challenger=version, champion=None, challenger_sites=mine, champion_sites={}, source="no champion"
            )
        comparison = lineage.get("champion_comparison") or {}
        if comparison.get("champion") == champion and comparison.get("sites"):
            source = (
                f"one federated evaluation of both models on every site's held-out test split in {version}'s run "
                f"(round {lineage.get('round_of_weights')} weights vs {champion})"
            )
            theirs = comparison["sites"]
        else:
            reason = (
                "the challenger's run did not evaluate it"
                if not comparison
                else f"the challenger's run evaluated {comparison.get('champion')}, not {champion}"
            )
            source = (
                f"test metrics recorded by each model's own run ({reason}); the runs' test splits may differ, so "
                "the comparison is weaker than a joint evaluation"
            )
            theirs = ((self.stamp(champion).get("lineage") or {}).get("metrics") or {}).get("sites") or {}
        return decide(
            rule, challenger=version, champion=champion, challenger_sites=mine, champion_sites=theirs, source=source
        )

    def record_decision(
        self, name: str, rule: PromotionRule | None = None, *, who: str | None = None, why: str = ""
    ) -> Decision:
        """:meth:`decision`, logged as a ``decision`` event and written into the version's model card."""
        with self._locked():
            decision = self.decision(name, rule)
            self._append(
                {
                    "event": "decision",
                    "version": decision.challenger,
                    "who": who or default_who(),
                    "why": why or "promotion rule evaluated",
                    "decision": decision.to_dict(),
                }
            )
        self._write_card(decision.challenger)
        return decision

    def promote(
        self,
        name: str,
        *,
        reason: str = "",
        who: str | None = None,
        rule: PromotionRule | None = None,
        override: bool = False,
    ) -> Decision:
        """Make version ``name`` the champion if it passes the promotion rule against the current champion.

        A challenger that fails is refused (:class:`PromotionRefused` with the decision) unless ``override`` is set
        with a non-empty ``reason``; the override is logged with the failed decision.
        """
        if override and not reason.strip():
            raise RegistryError("an override of the promotion rule needs a reason (--reason)")
        with self._locked():
            decision = self.decision(name, rule)
            if not decision.passed and not override:
                raise PromotionRefused(
                    f"registry {self.root}: not promoted: {decision.summary()}. Promote anyway only "
                    "with --override --reason",
                    decision,
                )
            self._append(
                {
                    "event": "promote",
                    "version": decision.challenger,
                    "previous": decision.champion,
                    "who": who or default_who(),
                    "why": reason or decision.summary(),
                    "override": bool(override and not decision.passed),
                    "decision": decision.to_dict(),
                }
            )
        self._write_card(decision.challenger)
        return decision

    def rollback(self, *, reason: str, who: str | None = None, to: str | None = None) -> str:
        """Restore the previous champion (or ``to``, an earlier champion); return the champion now. Needs a reason."""
        if not reason.strip():
            raise RegistryError("a rollback needs a reason (--reason)")
        with self._locked():
            history = self.champion_history()
            if not history:
                raise RegistryError(f"registry {self.root}: no champion to roll back")
            earlier = history[:-1]
            target = to if to is not None else (earlier[-1] if earlier else None)
            if target is None:
                raise RegistryError(
                    f"registry {self.root}: {history[-1]} is the only champion there has been; nothing to roll back to"
                )
            if target not in earlier:
                raise RegistryError(
                    f"registry {self.root}: {target!r} is not an earlier champion (earlier: "
                    f"{', '.join(earlier) or 'none'})"
                )
            self.bundle_path(target)  # its files still match the hash
            self._append(
                {
                    "event": "rollback",
                    "version": target,
                    "previous": history[-1],
                    "who": who or default_who(),
                    "why": reason,
                }
            )
        self._write_card(target)
        self._write_card(history[-1])
        return target

    # -- the model card ------------------------------------------------------------------------------------------

    def _write_card(self, version: str) -> None:
        """Rewrite the version's ``model_card.md``: the bundle's card plus the registry section."""
        from models.bundle import model_card

        folder = self.root / VERSIONS_DIR / version
        meta = json.loads((folder / "model.json").read_text())
        atomic_write_bytes(folder / "model_card.md", (model_card(meta) + "\n" + self.card_section(version)).encode())

    def card_section(self, version: str) -> str:
        """The model card's registry section: version, hash, lineage, and every decision, promotion and rollback."""
        stamp = self.stamp(version)
        lineage = stamp.get("lineage") or {}
        status = "the current champion" if self.champion() == version else "not the champion"
        head = (
            f"Version {version} (content SHA-256 {stamp['content_sha256']}), registered {stamp['registered_utc']}; parent "
            f"{lineage.get('parent') or 'none (trained from scratch)'}; pipeline version {lineage.get('pipeline_version')}; "
            f"{status}."
        )
        lines = ["## Registry", head, ""]
        campaign = _campaign_line(lineage)
        if campaign:
            lines += [campaign, ""]
        for event in self.events():
            if event.get("version") != version and event.get("previous") != version:
                continue
            kind = event["event"]
            who = f"{event.get('who')} at {event.get('utc')}"
            if kind in ("decision", "promote") and event.get("version") == version:
                d = event.get("decision") or {}
                head = {"decision": "Promotion rule evaluated", "promote": "Promoted to champion"}[kind]
                if kind == "promote" and event.get("override"):
                    head += " **by override of a failed rule**"
                lines.append(
                    f"- {head} ({who}): {'passed' if d.get('passed') else 'failed'} against "
                    f"{d.get('champion') or 'no champion'}; {event.get('why')}"
                )
                lines += _decision_lines(d)
            elif kind == "promote":
                lines.append(f"- Replaced as champion by {event['version']} ({who}).")
            elif kind == "rollback" and event.get("version") == version:
                lines.append(f"- Champion again by rollback from {event.get('previous')} ({who}): {event.get('why')}")
            elif kind == "rollback":
                lines.append(f"- Rolled back to {event['version']} ({who}): {event.get('why')}")
        return "\n".join(lines) + "\n"


def _campaign_line(lineage: Mapping[str, Any]) -> str:
    """What the sites brought to this campaign: new studies and clinician-feedback labels per site ("" when unknown;
    "withheld" where a site's privacy floor kept a count back)."""
    new = lineage.get("new_studies") or {}
    feedback = lineage.get("feedback_labels") or {}
    if not new and not feedback:
        return ""

    def count(value: Any) -> str:
        return "withheld" if value is None else str(int(value))

    parts = []
    for site in sorted(set(new) | set(feedback)):
        f = feedback.get(site) or {}
        parts.append(
            f"{site}: new studies {count(new.get(site))}, feedback labels used {count(f.get('used'))}, "
            f"conflicts with labels.csv {count(f.get('conflicts'))}"
        )
    return "Campaign: " + "; ".join(parts) + "."


def _decision_lines(d: Mapping[str, Any]) -> list[str]:
    """The numbers of a decision as indented Markdown lines."""
    rule = d.get("rule") or {}
    if not d.get("champion"):
        return []
    lines = [
        (
            f"  - Rule: {rule.get('metric')} ({rule.get('direction')}), per-site margin {rule.get('margin')}, overall "
            f"min gain {rule.get('min_gain')}. Numbers: {d.get('source')}."
        )
    ]
    for site, e in sorted((d.get("sites") or {}).items()):
        lines.append(
            f"  - {site}: challenger {_fmt(e.get('challenger'))}, champion {_fmt(e.get('champion'))} "
            f"({'ok' if e.get('passed') else 'fails'})"
        )
    o = d.get("overall") or {}
    if o:
        lines.append(
            f"  - overall (test-count-weighted): challenger {_fmt(o.get('challenger'))}, champion "
            f"{_fmt(o.get('champion'))} ({'better' if o.get('passed') else 'not better'})"
        )
    return lines


def _rule_of(lineage: Mapping[str, Any]) -> PromotionRule:
    """The promotion rule a run was configured with (its ``promotion-*`` run-config keys), else the defaults."""
    config = lineage.get("run_config") or {}
    defaults = PromotionRule()
    return PromotionRule(
        metric=str(config.get("promotion-metric", defaults.metric)),
        margin=float(config.get("promotion-margin", defaults.margin)),
        min_gain=float(config.get("promotion-min-gain", defaults.min_gain)),
    )
