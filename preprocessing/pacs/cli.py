"""The PACS options of the ``fedct`` command: ``fedct ingest --pacs [URL]`` (pull) and ``fedct predict --push [URL]``
(push), both with ``--pacs-env FILE`` (the site env file holding the ``FEDCT_PACS_*`` settings and credentials)."""

from __future__ import annotations

import argparse
from pathlib import Path

from preprocessing.pacs.connection import Query
from preprocessing.pacs.pull import pull
from preprocessing.pacs.settings import PacsSettings, read_pacs_settings

_PACS_ENV_HELP = "site env file with the FEDCT_PACS_* settings and credentials"


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pacs [URL]`` and ``--pacs-env FILE`` of ``fedct ingest``."""
    parser.add_argument(
        "--pacs",
        nargs="?",
        const="",
        metavar="URL",
        help="pull the studies from the PACS first (http(s)://host/dicom-web or dicom://AET@host:port; "
        "without URL: FEDCT_PACS_URL of --pacs-env); --input is then where they are kept (default OUT/pacs)",
    )
    parser.add_argument("--pacs-env", metavar="FILE", help=_PACS_ENV_HELP)


def pull_for_ingest(args: argparse.Namespace) -> Path:
    """Pull for ``fedct ingest --pacs``: the query from the env file and the labels' study keys; return the folder.

    Raises ``ValueError`` (bad settings, before anything is fetched) or :class:`PacsError`.
    """
    from preprocessing.labels import read_labels

    settings = read_pacs_settings(Path(args.pacs_env) if args.pacs_env else None, url=args.pacs or None)
    query = Query(modality=settings.modality, study_date=settings.study_date)
    if args.labels:
        labels = read_labels(Path(args.labels))
        keys = tuple(sorted(labels))
        query = Query(
            modality=settings.modality,
            study_date=settings.study_date,
            study_uids=keys if labels.key == "StudyInstanceUID" else (),
            accession_numbers=keys if labels.key == "AccessionNumber" else (),
        )
    dest = Path(args.input) if args.input else Path(args.out) / "pacs"
    result = pull(settings, dest, query=query, progress=True)
    print(
        f"PACS {result.url}: {result.studies} studies, {result.series} series, {result.instances} instances; fetched "
        f"{result.fetched} ({result.bytes_written / 1e6:.1f} MB), {result.present} already here; {result.seconds} s -> {dest}"
    )
    return dest


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """``--push [URL]`` and ``--pacs-env FILE`` of ``fedct predict``."""
    parser.add_argument(
        "--push",
        nargs="?",
        const="",
        metavar="URL",
        help="store the SR and Secondary Captures in the PACS (http(s)://host/dicom-web: STOW-RS; "
        "dicom://AET@host:port: C-STORE; without URL: FEDCT_PACS_URL of --pacs-env)",
    )
    parser.add_argument("--pacs-env", metavar="FILE", help=_PACS_ENV_HELP)


def push_settings(args: argparse.Namespace) -> PacsSettings | None:
    """The push settings of ``fedct predict`` (None without ``--push``), checked before anything is predicted."""
    if args.push is None:
        return None
    return read_pacs_settings(Path(args.pacs_env) if args.pacs_env else None, url=args.push or None)
