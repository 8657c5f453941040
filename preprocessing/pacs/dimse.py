"""DIMSE with ``pynetdicom`` (Study Root): C-FIND and C-GET, or C-MOVE to this site's own storage SCP (pull), and
C-STORE (push), over TLS when ``FEDCT_PACS_TLS_CA`` is set.

Every request opens its own association with this site's calling AE title (``FEDCT_PACS_AET``); under TLS the
PACS's certificate and host name are verified against ``FEDCT_PACS_TLS_CA`` (TLS 1.2+) and this site presents its
certificate when set. The C-MOVE storage SCP listens only on ``FEDCT_PACS_LISTEN_ADDRESS`` (default 127.0.0.1),
accepts only the PACS's AE title and only the series being retrieved.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from preprocessing.pacs.connection import Query
from preprocessing.pacs.retry import Refused, Transient, Unreachable
from preprocessing.pacs.settings import PacsSettings, endpoint
from preprocessing.pacs.store import InstanceStore, SeriesRef

#: C-STORE statuses that mean stored (success; coercion / elements discarded warnings).
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: Why an association was rejected, per direction: what this site's AE title must be allowed at the PACS.
_PULL_RIGHTS = "is registered at the PACS for this host"
_PUSH_RIGHTS = "may store at the PACS from this host"


def dimse_tls_args(settings: PacsSettings) -> tuple[Any, str] | None:
    """pynetdicom's ``tls_args`` for an association to the PACS: a client ``ssl`` context that verifies the PACS's
    certificate (and its host name) against ``FEDCT_PACS_TLS_CA`` and presents this site's certificate if set;
    None without TLS."""
    import ssl

    if settings.tls_ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context, endpoint(settings.url).host


def dimse_server_tls(settings: PacsSettings) -> Any:
    """The ``ssl`` context of this site's C-MOVE storage SCP under TLS (its certificate; the PACS's verified against
    ``FEDCT_PACS_TLS_CA``), or None without TLS."""
    import ssl

    if settings.tls_ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(settings.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


class DimseConnection:
    """C-FIND + C-GET (or C-MOVE to our own storage SCP) for the pull, C-STORE for the push, with ``pynetdicom``."""

    def __init__(self, settings: PacsSettings) -> None:
        self.settings = settings
        self.endpoint = endpoint(settings.url)

    @contextmanager
    def _association(
        self,
        contexts: Sequence[tuple[str, Sequence[str] | str | None]],
        *,
        get_storage: Sequence[str] = (),
        rights: str = _PULL_RIGHTS,
    ) -> Iterator[Any]:
        """An association requesting ``contexts`` ((SOP class, transfer syntaxes or None for pynetdicom's default));
        ``get_storage``: SOP classes this site accepts as SCP during a C-GET."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role

        ae = AE(ae_title=self.settings.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        for sop_class, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(sop_class)
            else:
                ae.add_requested_context(sop_class, syntaxes)
        for sop_class in get_storage:
            ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES[:16])
        roles = [build_role(sop_class, scp_role=True) for sop_class in get_storage]
        handlers = [(_evt_store(), self._on_c_store)] if get_storage else []
        assoc = ae.associate(
            self.endpoint.host,
            self.endpoint.port,
            ae_title=self.endpoint.called_aet,
            ext_neg=roles,
            evt_handlers=handlers,
            tls_args=dimse_tls_args(self.settings),
        )
        if assoc.is_rejected:
            raise Refused(
                f"the association was rejected: check the called AE title in the URL ({self.endpoint.called_aet}) and that "
                f"FEDCT_PACS_AET ({self.settings.calling_aet}) {rights}"
            )
        if not assoc.is_established:
            raise Unreachable("no association (connection refused, aborted or timed out)")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _on_c_store(self, event: Any) -> int:
        """A C-STORE sub-operation of our C-GET / C-MOVE: the instance goes to the store, if of the series retrieved."""
        store, ref = self._target
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if str(event.dataset.SeriesInstanceUID) != ref.series_uid:  # C-MOVE: only the series being retrieved
            return 0xA900
        store.write(ref, sop_uid, lambda tmp: tmp.write_bytes(event.encoded_dataset(include_meta=True)))
        return 0x0000

    def _find(self, identifier: Any) -> list[Any]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        with self._association([(FIND, None)]) as assoc:
            matches = []
            for status, found in assoc.send_c_find(identifier, FIND):
                _check_status(status, "C-FIND")
                if found is not None and status.Status in (0xFF00, 0xFF01):
                    matches.append(found)
            return matches

    def find_series(self, query: Query) -> list[SeriesRef]:
        """C-FIND at study level (modality in study, date, keys), then at series level per study."""
        from pydicom import Dataset

        study_uids = list(query.study_uids)
        if not study_uids:
            keys = list(query.accession_numbers) or [None]
            for accession in keys:
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID = ""
                ds.ModalitiesInStudy = query.modality
                ds.StudyDate = query.study_date or ""
                ds.AccessionNumber = accession or ""
                study_uids += [str(m.StudyInstanceUID) for m in self._find(ds) if m.get("StudyInstanceUID")]
        refs: dict[tuple[str, str], SeriesRef] = {}
        for study_uid in dict.fromkeys(study_uids):
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = ""
            ds.Modality = query.modality
            for match in self._find(ds):
                if match.get("SeriesInstanceUID") and str(match.get("Modality", query.modality)) == query.modality:
                    refs[(study_uid, str(match.SeriesInstanceUID))] = SeriesRef(study_uid, str(match.SeriesInstanceUID))
        return list(refs.values())

    def list_instances(self, ref: SeriesRef) -> list[str]:
        """C-FIND at image level: the SOP Instance UIDs of one series."""
        from pydicom import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = ref.study_uid
        ds.SeriesInstanceUID = ref.series_uid
        ds.SOPInstanceUID = ""
        return [str(m.SOPInstanceUID) for m in self._find(ds) if m.get("SOPInstanceUID")]

    def fetch(self, ref: SeriesRef, sop_uids: Sequence[str] | None, store: InstanceStore) -> None:
        """C-GET (or C-MOVE) of the whole series (``sop_uids`` None) or of single instances; each is written as it arrives."""
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        from preprocessing.discover import CT_SOP_CLASSES

        self._target = (store, ref)
        identifiers: list[Dataset] = []
        for uid in [None] if sop_uids is None else list(sop_uids):
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES" if uid is None else "IMAGE"
            ds.StudyInstanceUID = ref.study_uid
            ds.SeriesInstanceUID = ref.series_uid
            if uid is not None:
                ds.SOPInstanceUID = uid
            identifiers.append(ds)
        if self.settings.move_port is None:
            with self._association([(GET, None)], get_storage=sorted(CT_SOP_CLASSES)) as assoc:
                for identifier in identifiers:
                    for status, _ in assoc.send_c_get(identifier, GET):
                        _check_status(status, "C-GET")
            return
        with self._storage_scp(sorted(CT_SOP_CLASSES)), self._association([(MOVE, None)]) as assoc:
            for identifier in identifiers:
                for status, _ in assoc.send_c_move(identifier, self.settings.calling_aet, MOVE):
                    _check_status(status, "C-MOVE")

    @contextmanager
    def _storage_scp(self, sop_classes: Sequence[str]) -> Iterator[None]:
        """A storage SCP on FEDCT_PACS_LISTEN_ADDRESS:FEDCT_PACS_MOVE_PORT for the C-MOVE's sub-operations, accepting only
        the PACS's AE title (over TLS when FEDCT_PACS_TLS_CA is set)."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES

        ae = AE(ae_title=self.settings.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        ae.require_calling_aet = [self.endpoint.called_aet]
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        try:
            server = ae.start_server(
                (self.settings.listen_address, self.settings.move_port),
                block=False,
                ssl_context=dimse_server_tls(self.settings),
                evt_handlers=[(_evt_store(), self._on_c_store)],
            )
        except OSError as exc:
            raise Refused(
                f"cannot listen on FEDCT_PACS_LISTEN_ADDRESS {self.settings.listen_address} FEDCT_PACS_MOVE_PORT "
                f"{self.settings.move_port} for C-MOVE: {exc.strerror}"
            ) from exc
        self.listening = server.server_address
        try:
            yield
        finally:
            server.shutdown()

    def store(self, study_uid: str, paths: Sequence[Path]) -> None:
        """C-STORE of one study's files over one association (each file in its own transfer syntax)."""
        import pydicom

        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        contexts = sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers})
        with self._association(contexts, rights=_PUSH_RIGHTS) as assoc:
            for path in paths:
                status = assoc.send_c_store(path)
                if status is None or "Status" not in status:
                    raise Transient("C-STORE: no reply (association aborted or timed out)")
                if int(status.Status) not in STORED:
                    raise Refused(
                        f"C-STORE refused with status 0x{int(status.Status):04X}: check that the PACS accepts SR and "
                        "Secondary Capture objects from this AE title"
                    )


def _evt_store() -> Any:
    from pynetdicom import evt

    return evt.EVT_C_STORE


def _check_status(status: Any, what: str) -> None:
    """Raise on a missing or failed DIMSE status; 'out of resources' (0xA7xx) and a lost link are transient."""
    if status is None or "Status" not in status:
        raise Transient(f"{what}: no reply (association aborted or timed out)")
    code = int(status.Status)
    if code in (0x0000, 0xFF00, 0xFF01):  # success, pending
        return
    if code == 0xB000:
        raise Refused(f"{what}: some sub-operations failed (status 0xB000): check the PACS log for storage to this AE")
    if code >> 8 == 0xA7:
        raise Transient(f"{what}: PACS out of resources (status 0x{code:04X})")
    raise Refused(f"{what}: failure status 0x{code:04X}; check that FEDCT_PACS_AET may query and retrieve at the PACS")
