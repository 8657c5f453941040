"""The ``fedct`` command: synth, ingest, deid, demo, predict, review, status, models, bench."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Privacy: Flower's telemetry stays off in every process this command starts.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _synth(args: argparse.Namespace) -> int:
    from synthetic.hospitals import write_federation

    summary = write_federation(
        Path(args.out),
        sites=args.sites,
        patients_per_site=args.patients_per_site,
        seed=args.seed,
        progress=None if args.quiet else _print_progress,
    )
    for site in summary.sites:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(site.class_counts.items()))
        print(f"{site.name}: {site.n_patients} patients, {site.n_files} files ({counts})")
    print(f"wrote {summary.root}")
    return 0


def _print_progress(message: str) -> None:
    print(f"  {message}", flush=True)


def _ingest(args: argparse.Namespace) -> int:
    from fedct.protocol import parse_triple
    from preprocessing.ingest import REPORT_NAME, ingest_site
    from preprocessing.labels import LabelsError
    from preprocessing.pacs import PacsError, pull_for_ingest
    from preprocessing.pipeline import PipelineConfig  # torch-free: workers import torch, see ingest.pool_context

    try:
        pipeline = PipelineConfig(
            target_spacing_mm=parse_triple(args.spacing, float, "--spacing"),
            input_size=parse_triple(args.input_size, int, "--input-size"),
        )
        if args.pacs is not None:  # the PACS is the source: pull what is missing into the site's folder first
            args.input = str(pull_for_ingest(args))
        elif not args.input:
            raise ValueError("give --input FOLDER or --pacs [URL]")
        manifest = ingest_site(
            Path(args.input),
            Path(args.out),
            labels_csv=Path(args.labels) if args.labels else None,
            pipeline=pipeline,
            workers=args.workers,
            progress=True,
            export_hu=args.export_hu,
        )
    except (
        OSError,
        LabelsError,
        ValueError,
        PacsError,
    ) as exc:  # missing/unwritable folders, bad labels, bad options, PACS
        print(f"fedct ingest: error: {exc}", file=sys.stderr)
        return 2
    import json

    report = json.loads((Path(args.out) / REPORT_NAME).read_text())
    counts = report["counts"]
    print(
        f"accepted {counts['accepted']} series, rejected {counts['rejected']} file(s)/series in {report['seconds']} s"
    )
    for reason, n in sorted(counts["by_reason"].items()):
        print(f"  {reason}: {n}")
    print(f"splits: {counts['by_split']}; report: {Path(args.out) / REPORT_NAME}")
    del manifest
    return 0


def _deid(args: argparse.Namespace) -> int:
    from preprocessing.deid import load_or_create_site_key
    from preprocessing.deidentify import deidentify_folder

    try:
        key = load_or_create_site_key(Path(args.site_dir))
        result = deidentify_folder(
            Path(args.input), Path(args.out), site_key=key, keep_private_tags=args.keep_private_tags, progress=True
        )
    except (OSError, ValueError) as exc:
        print(f"fedct deid: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"de-identified {result.files_written} file(s) of {result.studies} study(ies) in {result.seconds:.1f} s -> {args.out}"
    )
    for path, reason in result.files_skipped:
        print(f"  skipped {path}: {reason}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from inference.local_identity import ENV_KEY, identifiers_setting
    from inference.predict import run_predict
    from inference.push import push_results
    from preprocessing.pacs import push_settings

    try:
        identifiers = identifiers_setting(
            no_local_identifiers=args.no_local_identifiers, env_file=Path(args.pacs_env) if args.pacs_env else None
        )
        if not identifiers and args.push is not None:
            raise ValueError(
                f"--push stores the results with the patient's study in the PACS, which files them by patient: "
                f"a research copy (--no-local-identifiers or {ENV_KEY}=no) has no patient identification; "
                "leave out --push, or write the results with identifiers to push them"
            )
        push = push_settings(args)  # --push: PACS settings checked before anything is predicted
        if args.model in (None, "champion") and not args.site_dir:
            raise ValueError("give --model, or --site-dir to predict with the champion the site received")
        summary = run_predict(
            Path(args.site_dir) if args.model in (None, "champion") else Path(args.model),
            Path(args.input),
            Path(args.out),
            device=args.device,
            progress=True,
            site_dir=Path(args.site_dir) if args.site_dir else None,
            local_identifiers=identifiers,
            profile_dir=Path(args.profile) if args.profile else None,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"fedct predict: error: {exc}", file=sys.stderr)
        return 2
    for result in summary.results:
        print(
            f"{result.study_key}: {result.diagnosis} ({result.probabilities[result.diagnosis]:.0%}), risk {result.risk_group}"
        )
    for refused in summary.refused:
        print(f"refused {refused['path']}: {refused['reason']} - {refused['message']}")
    for error in summary.errors:
        print(f"warning: {error}")
    if summary.results:
        from inference.wording import registry_words

        print(f"model: {registry_words(summary.results[0].model) or 'not a registered version'}")
    print(f"{len(summary.results)} study(ies) predicted, {len(summary.refused)} refused; reports in {args.out}")
    if push is not None:  # --push: this run's SR and Secondary Captures to the PACS
        return push_results(push, summary.out_dir, [r.study_key for r in summary.results])
    return 0


def _review(args: argparse.Namespace) -> int:
    from inference.review import serve

    try:
        serve(Path(args.results), host=args.host, port=args.port, db_path=Path(args.db) if args.db else None)
    except (OSError, ValueError) as exc:
        print(f"fedct review: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedct.demo import DemoOptions, run_demo

    options = DemoOptions(
        out=Path(args.out),
        sites=args.sites,
        patients_per_site=args.patients_per_site,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        model_name=args.model,
        seed=args.seed,
        external_studies=args.external_studies,
        profile_fusion=args.profile_fusion,
    )
    return run_demo(options)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fedct {version('fedct')}"
    except PackageNotFoundError:
        return "fedct (not installed)"


def _certs(args: argparse.Namespace) -> int:
    from fedct.certs import certs_command  # cryptography only when certificates are made

    return certs_command(args)


def _site_key(args: argparse.Namespace) -> int:
    from fedct.certs import site_key_command

    return site_key_command(args)


def _add_certs_parsers(sub: argparse._SubParsersAction) -> None:
    """``fedct certs`` and ``fedct site-key``; their module (and cryptography) is imported only when they run, so
    the other commands work where cryptography is not installed (e.g. a compute-only machine running benchmarks)."""
    p = sub.add_parser("certs", help="coordinator: make the consortium's CA and the SuperLink certificate")
    p.add_argument("--out", required=True, help="output folder (ca/, server/; sites/<name>/ with --with-site-keys)")
    p.add_argument(
        "--san",
        action="append",
        help="server certificate SAN (DNS name or IP the hospitals connect to); "
        "repeat; localhost and 127.0.0.1 are always added",
    )
    p.add_argument("--sites", help="with --with-site-keys: comma-separated site names, e.g. site-a,site-b")
    p.add_argument(
        "--with-site-keys",
        action="store_true",
        help="also make the sites' private keys here (tests and demos only: real sites run `fedct site-key`)",
    )
    p.set_defaults(func=_certs)
    p = sub.add_parser("site-key", help="site: make this site's SuperNode key pair and print the public key to send")
    p.add_argument(
        "--out", required=True, help="private key file to create, e.g. /site/pki/site.key (site.pub goes next to it)"
    )
    p.set_defaults(func=_site_key)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``fedct`` command."""
    parser = argparse.ArgumentParser(prog="fedct", description="Federated learning on CT imaging.")
    parser.add_argument("--version", action="version", version=_version())  # containers' self-check
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic hospitals (CT DICOM + labels.csv per site)")
    p.add_argument("--out", required=True, help="output folder (site-0/, site-1/, ...)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients-per-site", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_synth)

    p = sub.add_parser("ingest", help="validate and preprocess a site's DICOM folder")
    p.add_argument(
        "--input", help="DICOM folder (read only); with --pacs where pulled studies are kept (default OUT/pacs)"
    )
    p.add_argument("--out", required=True, help="site work folder (manifest, cache, report)")
    p.add_argument("--labels", help="labels.csv keyed by StudyInstanceUID")
    p.add_argument("--spacing", default="5.0,5.0,5.0", help="target voxel spacing in mm, x,y,z")
    p.add_argument("--input-size", default="64,64,48", help="model input size in voxels, x,y,z")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--export-hu",
        action="store_true",
        help="also write each accepted series' HU volume as NIfTI (SITE_DIR/nifti/<id>.nii.gz)",
    )
    from preprocessing.pacs import add_pull_arguments  # --pacs [URL], --pacs-env FILE

    add_pull_arguments(p)
    p.set_defaults(func=_ingest)

    p = sub.add_parser(
        "deid", help="write de-identified copies (DICOM PS3.15 Basic Application Level Confidentiality Profile)"
    )
    p.add_argument("--input", required=True, help="DICOM folder (read only)")
    p.add_argument("--out", required=True, help="output folder; file paths are made of pseudonyms and new UIDs only")
    p.add_argument(
        "--site-dir", required=True, help="the site's work folder holding site.key (pseudonyms, UIDs, date shifts)"
    )
    p.add_argument("--keep-private-tags", action="store_true", help="keep private attributes (not profile conformant)")
    p.set_defaults(func=_deid)

    p = sub.add_parser(
        "predict", help="predict new studies with a model bundle; write reports, overlays and DICOM results"
    )
    p.add_argument(
        "--model",
        help="model bundle folder (model.pt + model.json), or a model registry folder (its champion is used); "
        "left out (or 'champion'): the consortium's champion the site received (SITE_DIR/models, needs --site-dir)",
    )
    p.add_argument("--input", required=True, help="folder with one or more CT studies (read only)")
    p.add_argument("--out", required=True, help="results folder (one sub-folder per study)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--site-dir", help="the site's work folder: name result folders by the site's keyed study pseudonyms"
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="folder of the site's clinical/molecular profile export (profile-mapping.toml + table, as for "
        "training): a bundle that fuses the profile reads each study's row there (else all missing)",
    )
    p.add_argument(
        "--no-local-identifiers",
        action="store_true",
        help="research copy: do not read or write accession number, patient name and ID (shown by default "
        "in the site-local report, review page and SR; also FEDCT_LOCAL_IDENTIFIERS=no in --pacs-env)",
    )
    from preprocessing.pacs import add_push_arguments  # --push [URL], --pacs-env FILE

    add_push_arguments(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("review", help="serve the clinicians' review page for a results folder (127.0.0.1 only)")
    p.add_argument("--results", required=True, help="results folder written by fedct predict")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--db",
        help="the feedback database (default RESULTS/feedback.sqlite); the site's FEDCT_FEEDBACK_DB when its "
        "feedback is used as training labels (FEDCT_FEEDBACK_LABELS=yes)",
    )
    p.set_defaults(func=_review)

    p = sub.add_parser("demo", help="synthetic federation end to end: synth, ingest, federated training, report")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients-per-site", type=int, default=80)  # = DemoOptions.patients_per_site (metrics floor)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--model", default="densenet121")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--external-studies",
        type=int,
        default=24,
        help="studies of the external validation family the model is scored on at the end (0: none)",
    )
    p.add_argument(
        "--profile-fusion",
        choices=("none", "late", "film"),
        default="none",
        help="fuse the synthetic sites' clinical/molecular profiles (federated normalisation first)",
    )
    p.set_defaults(func=_demo)

    from bench.cli import add_parser as add_bench_parser
    from fedct import deploy  # deployment: fedct server, fedct site
    from fedct.models_command import add_parser as add_models_parser  # fedct models list|show|promote|rollback
    from fedct.status import add_parser as add_status_parser
    from preprocessing.collections import add_parser as add_collection_parser  # fedct collection prepare
    from preprocessing.profile import add_parser as add_profile_parser  # fedct profile check

    _add_certs_parsers(sub)
    deploy.add_server_parser(sub)
    deploy.add_site_parser(sub)
    add_status_parser(sub)
    add_models_parser(sub)
    add_profile_parser(sub)
    add_bench_parser(sub)
    add_collection_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedct`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
