"""Results back to the PACS: the SR and Secondary Capture files of ``fedct predict`` with STOW-RS or C-STORE.

The files are those :mod:`inference.dicom_export` writes (``OUT/<study>/sr.dcm``, ``sc_NN.dcm``): they carry the
source study's StudyInstanceUID, so the PACS files them with the study, and deterministic UIDs, so pushing again
replaces rather than duplicates. The PACS URL and credentials come from the site env file as for the pull
(:func:`preprocessing.pacs.read_pacs_settings`); transient failures are retried with exponential backoff.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from preprocessing.pacs import PacsError, PacsSettings, endpoint, explain, read_pacs_settings, with_retries

_RESULT_FILE = re.compile(r"^(sr|sc_\d+)\.dcm$")
#: DIMSE C-STORE statuses that mean stored (success, coercion / elements discarded warnings).
_STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class PushResult:
    """What was stored: ``instances`` files of ``studies`` studies at ``url``."""

    url: str
    studies: int
    instances: int
    seconds: float


def result_files(results_dir: Path, study_keys: Iterable[str] | None = None) -> list[Path]:
    """The SR and Secondary Capture files under ``results_dir`` (of ``study_keys`` only, when given), in order."""
    results_dir = Path(results_dir)
    folders = [results_dir / key for key in study_keys] if study_keys is not None else sorted(results_dir.iterdir())
    return [p for folder in folders if folder.is_dir() for p in sorted(folder.iterdir()) if _RESULT_FILE.match(p.name)]


def push_files(settings: PacsSettings, files: Sequence[Path], *, sleep: Callable[[float], None] = time.sleep) -> PushResult:
    """Store ``files`` at the PACS (STOW-RS per study, or C-STORE); raise :class:`PacsError` naming what to check."""
    import pydicom

    t0 = time.perf_counter()
    by_study: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        try:
            by_study[str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)].append(path)
        except Exception as exc:
            raise ValueError(f"{path}: not a DICOM result file ({type(exc).__name__}: {exc})") from exc
    store = _stow if endpoint(settings.url).kind == "dicomweb" else _c_store
    for number, (study_uid, paths) in enumerate(sorted(by_study.items()), start=1):
        what = f"storing the results of study {number} of {len(by_study)} ({len(paths)} instances)"
        with_retries(settings, what, lambda study_uid=study_uid, paths=paths: store(settings, study_uid, paths), sleep=sleep)
    return PushResult(settings.url, len(by_study), len(files), round(time.perf_counter() - t0, 2))


def _stow(settings: PacsSettings, study_uid: str, paths: Sequence[Path]) -> None:
    """STOW-RS of one study's results; a failed SOP instance in the reply is an error."""
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if settings.user is not None:
        session.auth = (settings.user, settings.password or "")
    if settings.ca_file is not None:
        session.verify = str(settings.ca_file)
    client = DICOMwebClient(endpoint(settings.url).url, session=session, timeout=settings.timeout_s)
    client.set_http_retry_params(retry=False)
    reply = client.store_instances([pydicom.dcmread(p) for p in paths], study_instance_uid=study_uid)
    failed = reply.get("FailedSOPSequence", []) if reply is not None else []
    if failed:
        reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
        raise PacsError(f"PACS {settings.url} refused {len(failed)} of {len(paths)} result instances (failure reasons "
                        f"{', '.join(reasons)}): check that the PACS accepts SR and Secondary Capture objects")  # fmt: skip


def _c_store(settings: PacsSettings, study_uid: str, paths: Sequence[Path]) -> None:
    """C-STORE of one study's results over one association."""
    import pydicom
    from pynetdicom import AE

    from preprocessing.pacs import Refused, Transient, Unreachable, dimse_tls_args

    point = endpoint(settings.url)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    ae = AE(ae_title=settings.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
    for sop_class, syntax in sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(point.host, point.port, ae_title=point.called_aet, tls_args=dimse_tls_args(settings))
    if assoc.is_rejected:
        raise Refused(f"the association was rejected: check the called AE title in the URL ({point.called_aet}) and that "
                       f"FEDCT_PACS_AET ({settings.calling_aet}) may store at the PACS from this host")  # fmt: skip
    if not assoc.is_established:
        raise Unreachable("no association (connection refused, aborted or timed out)")
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            if status is None or "Status" not in status:
                raise Transient("C-STORE: no reply (association aborted or timed out)")
            if int(status.Status) not in _STORED:
                raise Refused(f"C-STORE refused with status 0x{int(status.Status):04X}: check that the PACS accepts SR and "
                               "Secondary Capture objects from this AE title")  # fmt: skip
    finally:
        if assoc.is_established:
            assoc.release()


# ---------------------------------------------------------------------------------------------------------------
# fedct predict --push


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """``--push [URL]`` and ``--pacs-env FILE`` of ``fedct predict``."""
    parser.add_argument("--push", nargs="?", const="", metavar="URL",
                        help="store the SR and Secondary Captures in the PACS (http(s)://host/dicom-web: STOW-RS; "
                             "dicom://AET@host:port: C-STORE; without URL: FEDCT_PACS_URL of --pacs-env)")  # fmt: skip
    parser.add_argument("--pacs-env", metavar="FILE", help="site env file with the FEDCT_PACS_* settings and credentials")


def push_settings(args: argparse.Namespace) -> PacsSettings | None:
    """The push settings of ``fedct predict`` (None without ``--push``), checked before anything is predicted."""
    if args.push is None:
        return None
    return read_pacs_settings(Path(args.pacs_env) if args.pacs_env else None, url=args.push or None)


def push_results(settings: PacsSettings, out_dir: Path, study_keys: Iterable[str] | None = None) -> int:
    """Push the DICOM results under ``out_dir`` (of ``study_keys``, e.g. this predict run's); print; return the exit code."""
    files = result_files(out_dir, study_keys)
    if not files:
        print("fedct predict: nothing to push (no SR/Secondary Capture was written)", file=sys.stderr)
        return 0
    try:
        result = push_files(settings, files)
    except (PacsError, ValueError, OSError) as exc:
        error = exc if isinstance(exc, (PacsError, ValueError)) else explain(exc, settings, what="storing results", attempts=1)
        print(f"fedct predict: error: results are in {out_dir} but were not pushed: {error}", file=sys.stderr)
        return 2
    print(f"pushed {result.instances} DICOM result(s) of {result.studies} study(ies) to PACS {result.url} in {result.seconds} s")
    return 0
