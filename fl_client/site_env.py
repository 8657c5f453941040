"""A site's env file, read and checked in one place before anything connects.

Hospital IT keeps one file per site (``configs/site.env`` is an example)::

    FEDCT_SITE_NAME=site-a
    FEDCT_SUPERLINK=fl.consortium.example:9092
    FEDCT_CA_CERT=/config/ca.crt
    FEDCT_SITE_KEY=/config/site.key
    FEDCT_DICOM_DIR=/data/dicom
    FEDCT_LABELS=/data/labels.csv          # optional
    FEDCT_PROFILE_DIR=/data/profile         # optional: profile-mapping.toml + the clinical/molecular table
    FEDCT_SITE_DIR=/site                    # work folder: cache, manifest, site.key of pseudonyms, Flower apps
    FEDCT_DEVICE=cpu                        # cpu, cuda or auto
    FEDCT_RUNTIME_PORT=9094                 # the SuperNode's local Runtime API port (127.0.0.1)
    FEDCT_APPROVED_APPS=/config/approval/approved-apps.txt   # allow-list of app (FAB) hashes, outside SITE_DIR
    FEDCT_CLIENTAPP_RUNNER=warm             # warm: fedct's warm executor (default); flower: Flower's SuperExec
    FEDCT_VAL_FRACTION=0.2                  # the site's own split (fixed at the site, never the server's)
    FEDCT_MAX_BATCH_SIZE=64                 # FEDCT_MAX_*/FEDCT_MIN_SPACING_MM/FEDCT_CACHE_MAX_GB: what the server may ask

``KEY=VALUE`` lines; ``#`` starts a comment; values may be quoted. Unknown ``FEDCT_`` keys are an error (a typo
must not silently fall back to a default). Every error names the file, the key and what to check.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedct import envfile
from fedct.envfile import EnvFileError
from fl_client.approval import (
    APPROVAL_DISABLED,
    APPROVAL_MODES,
    APPROVAL_SETTING,
    ApprovalConfigError,
    allow_list_from_value,
)
from fl_client.compute import NODE_KEYS as COMPUTE_ENV_KEYS
from fl_client.limits import LIMIT_KEYS, SiteLimits
from preprocessing.split import SplitConfig

if TYPE_CHECKING:
    from fl_client.config import SiteConfig


#: Keys of the site env file, with a one-line meaning (also used in error messages).
SITE_KEYS = {
    "FEDCT_SITE_NAME": "the site's name as the server sees it (letters, digits, '-', '_', '.')",
    "FEDCT_SUPERLINK": "host:port of the consortium's SuperLink",
    "FEDCT_CA_CERT": "the consortium CA certificate (PEM) that signed the SuperLink's certificate",
    "FEDCT_SITE_KEY": "this site's SuperNode authentication private key (OpenSSH EC key made here with `fedct site-key`)",
    "FEDCT_DICOM_DIR": "the hospital's DICOM export folder (read only)",
    "FEDCT_LABELS": "labels.csv for the studies (optional)",
    "FEDCT_PROFILE_DIR": "folder of the clinical/molecular profile export: profile-mapping.toml and the table it names "
    "(optional; default: the labels file's folder when it holds profile-mapping.toml)",
    "FEDCT_SITE_DIR": "the site's writable work folder (cache, manifest, Flower apps)",
    "FEDCT_DEVICE": "cpu, cuda or auto",
    "FEDCT_WORKERS": "ingestion/data-loading worker processes (default 2)",
    "FEDCT_RUNTIME_PORT": "local port of the SuperNode's Runtime API (default 9094; one per SuperNode on a host)",
    "FEDCT_APPROVED_APPS": "allow-list file of approved app hashes, outside FEDCT_SITE_DIR (default approved-apps.txt "
    "next to the env file)",
    APPROVAL_SETTING: f"required (default): only approved apps run; {APPROVAL_DISABLED}: every app runs unchecked "
    "(benchmarks and tests only; logged as a WARNING)",
    "FEDCT_VAL_FRACTION": "the site's validation fraction of patients (default 0.2; fixed at the site, the server "
    "cannot change it)",
    "FEDCT_TEST_FRACTION": "the site's test fraction of patients (default 0.2; fixed at the site)",
    **{env_key: meaning for _node, env_key, meaning in LIMIT_KEYS.values()},
    "FEDCT_INGEST_SPACING": "ingestion voxel spacing in mm, x,y,z (default 5.0,5.0,5.0; must match the run)",
    "FEDCT_INGEST_INPUT_SIZE": "ingestion model input size in voxels, x,y,z (default 64,64,48; must match the run)",
    "FEDCT_SKIP_INGEST": "true to start without ingesting first (the site then ingests on its first round)",
    "FEDCT_METRICS_MIN_COUNT": "privacy floor k: no metric sent depends on fewer studies (default 5; raises the run's, "
    "never lowers it)",
    **{env: meaning for env, meaning in COMPUTE_ENV_KEYS.values()},  # precision, loader: fl_client/compute.py
    "FEDCT_CLIENTAPP_RUNNER": "how ClientApps run: warm (default; fedct's executor, torch/MONAI imported once) or flower "
    "(Flower's SuperExec, a fresh process per message)",
    "FEDCT_FEEDBACK_LABELS": "yes: the review page's clinician feedback labels this site's training studies in the "
    "next campaign (default no; fl_client/campaign.py)",
    "FEDCT_FEEDBACK_DB": "the review page's feedback.sqlite (default FEDCT_SITE_DIR/feedback.sqlite)",
    "FEDCT_FEEDBACK_CONFLICT": "labels (default): labels.csv wins when feedback gives another diagnosis (counted); "
    "feedback: the clinician's diagnosis wins",
    # Read by `fedct predict --pacs-env FILE` (inference/local_identity.py), not by the federated client.
    "FEDCT_LOCAL_IDENTIFIERS": "yes (default): predict shows accession number, patient name and ID in the site-local "
    "report, review page and SR; no: research copies without them",
}
#: Node-config keys of clinician feedback as labels and their site env keys (fl_client/config.py reads them).
FEEDBACK_ENV_KEYS = {
    "feedback-labels": "FEDCT_FEEDBACK_LABELS",
    "feedback-db": "FEDCT_FEEDBACK_DB",
    "feedback-conflict": "FEDCT_FEEDBACK_CONFLICT",
}
#: Values of FEDCT_CLIENTAPP_RUNNER (the first is the default).
CLIENTAPP_RUNNERS = ("warm", "flower")
REQUIRED = (
    "FEDCT_SITE_NAME",
    "FEDCT_SUPERLINK",
    "FEDCT_CA_CERT",
    "FEDCT_SITE_KEY",
    "FEDCT_DICOM_DIR",
    "FEDCT_SITE_DIR",
)


class SiteEnvError(ValueError):
    """The site env file is missing, malformed or names something that does not work; the message says what to fix."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (fedct/envfile.py's syntax), as :class:`SiteEnvError` when malformed."""
    try:
        return envfile.read_env_file(path)
    except EnvFileError as exc:
        hint = " (pass --env with the site's env file)" if not Path(path).is_file() else ""
        raise SiteEnvError(f"{exc}{hint}") from exc


def parse_superlink_address(value: str, *, source: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into (host, port); the error names ``source``."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise SiteEnvError(f"{source}: {value!r} is not [IPv6]:port") from exc
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SiteEnvError(f"{source}: {value!r} is not host:port (e.g. fl.consortium.example:9092 or 10.0.0.5:9092)")
    if "://" in value or "/" in host or " " in host:
        raise SiteEnvError(f"{source}: {value!r} must be host:port without a scheme or path")
    return host, int(port_text)


def _readable_file(path: Path, key: str, env_path: Path) -> Path:
    if not path.is_file():
        raise SiteEnvError(f"{env_path}: {key}={path}: no such file ({SITE_KEYS[key]})")
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise SiteEnvError(
            f"{env_path}: {key}={path}: cannot be read ({exc.strerror}); check its owner and mode"
        ) from exc
    return path


def check_ca_certificate(path: Path, *, source: str) -> None:
    """The file holds at least one PEM X.509 certificate."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        raise SiteEnvError(f"{source}={path}: not a PEM certificate ({exc}); use ca.crt from `fedct certs`") from exc
    if not certs:
        raise SiteEnvError(f"{source}={path}: no certificate in the file")


def check_site_key(path: Path, *, source: str) -> None:
    """The file is an OpenSSH EC private key (what ``flower-supernode --auth-supernode-private-key`` loads),
    readable by this user only."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise SiteEnvError(
            f"{source}={path}: not an unencrypted OpenSSH private key ({exc}); make one at the site with `fedct site-key --out FILE`"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SiteEnvError(f"{source}={path}: the SuperNode key must be an EC key (ecdsa), got {type(key).__name__}")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SiteEnvError(f"{source}={path}: private key is readable by others (mode {mode:o}); run chmod 600 {path}")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class SiteEnv:
    """A site's validated deployment settings (from its env file)."""

    env_path: Path
    site_name: str
    superlink_host: str
    superlink_port: int
    ca_cert: Path
    site_key: Path
    dicom_dir: Path
    site_dir: Path
    labels_csv: Path | None = None
    #: FEDCT_PROFILE_DIR: the folder holding profile-mapping.toml (None: the labels file's folder, when it has one).
    profile_dir: Path | None = None
    device: str = "auto"
    workers: int = 2
    runtime_port: int = 9094
    approved_apps: Path | None = None  # None: approval disabled (only by FEDCT_APPROVAL=disabled-i-understand)
    ingest_spacing_mm: tuple[float, float, float] = (5.0, 5.0, 5.0)
    ingest_input_size: tuple[int, int, int] = (64, 64, 48)
    skip_ingest: bool = False
    clientapp_runner: str = CLIENTAPP_RUNNERS[0]
    #: Privacy floor k of the metrics this site sends (FEDCT_METRICS_MIN_COUNT, >= 5; the larger of this and the run's wins).
    metrics_min_count: int = 5
    #: The site's own split fractions (fixed at the site; the server's fractions are ignored).
    split: SplitConfig = field(default_factory=SplitConfig)
    #: What the server may ask of this site (FEDCT_MAX_*, FEDCT_MIN_SPACING_MM, FEDCT_CACHE_MAX_GB).
    limits: SiteLimits = field(default_factory=SiteLimits)
    #: Compute settings as node-config entries (``precision``, ``loader-workers``, ...; fl_client/compute.py).
    compute: dict[str, str] = field(default_factory=dict, compare=False)
    #: Clinician feedback as labels as node-config entries (``feedback-labels``, ``feedback-db``, ``feedback-conflict``).
    feedback: dict[str, str] = field(default_factory=dict, compare=False)
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def superlink(self) -> str:
        """``host:port`` as Flower expects it."""
        host = f"[{self.superlink_host}]" if ":" in self.superlink_host else self.superlink_host
        return f"{host}:{self.superlink_port}"

    @property
    def flwr_home(self) -> Path:
        """This site's own Flower home (installed apps), inside the work folder."""
        return self.site_dir / "flwr-home"

    @property
    def superexec_secret_file(self) -> Path:
        """Secret shared by the SuperNode and the warm executor (HMAC of task acquisition), in the work folder."""
        return self.site_dir / "state" / "superexec.secret"

    def site_config(self) -> SiteConfig:
        """The training-side view (what the ClientApp reads from ``node_config``)."""
        from fl_client.compute import ComputeOptions
        from fl_client.config import SiteConfig, feedback_setting  # torch-free import: `fedct --help` stays fast

        return SiteConfig(
            site_name=self.site_name,
            dicom_dir=self.dicom_dir,
            site_dir=self.site_dir,
            labels_csv=self.labels_csv,
            device=self.device,
            workers=self.workers,
            profile_dir=self.profile_dir or _default_profile_dir(self.labels_csv),
            limits=self.limits,
            split=self.split,
            compute=ComputeOptions.from_node_config(self.compute),
            feedback=feedback_setting(self.feedback, self.site_dir, "feedback-"),
        )

    def node_config(self) -> dict[str, str | int]:
        """The SuperNode's ``--node-config`` entries (keys of ``SiteConfig.from_context``)."""
        config: dict[str, str | int] = {
            "site-name": self.site_name,
            "dicom-dir": str(self.dicom_dir),
            "site-dir": str(self.site_dir),
            "device": self.device,
            "num-workers": self.workers,
            "metrics-min-count": self.metrics_min_count,
            "val-fraction": self.split.val_fraction,
            "test-fraction": self.split.test_fraction,
            **self.limits.node_config(),
            **self.compute,
            **self.feedback,
        }
        if self.labels_csv is not None:
            config["labels"] = str(self.labels_csv)
        if self.profile_dir is not None:
            config["profile-dir"] = str(self.profile_dir)
        return config

    @classmethod
    def from_file(cls, path: Path, *, check_cuda: bool = True) -> SiteEnv:
        """Read and validate ``path``; every problem is a :class:`SiteEnvError` naming the key and what to check."""
        from fl_client.config import DEVICES, SiteConfigError, parse_triple

        path = Path(path)
        values = read_env_file(path)
        # FEDCT_PACS_* keys belong to the PACS settings (preprocessing.pacs.read_pacs_settings checks them itself).
        unknown = sorted(
            k for k in values if k.startswith("FEDCT_") and not k.startswith("FEDCT_PACS_") and k not in SITE_KEYS
        )
        if unknown:
            raise SiteEnvError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(SITE_KEYS)}")
        missing = [k for k in REQUIRED if not values.get(k)]
        if missing:
            raise SiteEnvError(f"{path}: missing " + "; ".join(f"{k} ({SITE_KEYS[k]})" for k in missing))
        base = path.parent

        def a_path(key: str) -> Path:
            p = Path(os.path.expanduser(values[key]))
            return p if p.is_absolute() else (base / p).resolve()

        host, port = parse_superlink_address(values["FEDCT_SUPERLINK"], source=f"{path}: FEDCT_SUPERLINK")
        ca_cert = _readable_file(a_path("FEDCT_CA_CERT"), "FEDCT_CA_CERT", path)
        check_ca_certificate(ca_cert, source=f"{path}: FEDCT_CA_CERT")
        site_key = _readable_file(a_path("FEDCT_SITE_KEY"), "FEDCT_SITE_KEY", path)
        check_site_key(site_key, source=f"{path}: FEDCT_SITE_KEY")
        dicom_dir = a_path("FEDCT_DICOM_DIR")
        if not dicom_dir.is_dir():
            raise SiteEnvError(f"{path}: FEDCT_DICOM_DIR={dicom_dir}: no such folder ({SITE_KEYS['FEDCT_DICOM_DIR']})")
        try:
            empty = not any(p.is_file() for p in dicom_dir.rglob("*"))
        except OSError as exc:
            raise SiteEnvError(f"{path}: FEDCT_DICOM_DIR={dicom_dir}: cannot be listed ({exc})") from exc
        if empty:
            raise SiteEnvError(
                f"{path}: FEDCT_DICOM_DIR={dicom_dir}: the folder holds no file; is the DICOM export mounted?"
            )
        labels = _readable_file(a_path("FEDCT_LABELS"), "FEDCT_LABELS", path) if values.get("FEDCT_LABELS") else None
        profile_dir = None
        if values.get("FEDCT_PROFILE_DIR"):
            from preprocessing.profile import MAPPING_NAME

            profile_dir = a_path("FEDCT_PROFILE_DIR")
            if not (profile_dir / MAPPING_NAME).is_file():
                raise SiteEnvError(
                    f"{path}: FEDCT_PROFILE_DIR={profile_dir}: no {MAPPING_NAME} there "
                    f"({SITE_KEYS['FEDCT_PROFILE_DIR']}; check it with `fedct profile check --site DIR`)"
                )
        site_dir = a_path("FEDCT_SITE_DIR")
        try:
            site_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SiteEnvError(f"{path}: FEDCT_SITE_DIR={site_dir}: cannot be created ({exc.strerror})") from exc
        if not os.access(site_dir, os.W_OK | os.X_OK):
            raise SiteEnvError(f"{path}: FEDCT_SITE_DIR={site_dir}: not writable by this user")
        device = values.get("FEDCT_DEVICE", "auto") or "auto"
        if device not in DEVICES:
            raise SiteEnvError(f"{path}: FEDCT_DEVICE={device!r} is not one of {', '.join(DEVICES)}")
        if device == "cuda" and check_cuda and not _cuda_available():
            raise SiteEnvError(
                f"{path}: FEDCT_DEVICE=cuda but no CUDA device is visible to this process "
                "(check the driver, `nvidia-smi`, and that the container gets the GPU); "
                "set FEDCT_DEVICE=cpu to train on the CPU"
            )

        def an_int(key: str, default: int, low: int, high: int) -> int:
            text = values.get(key, "") or str(default)
            if not text.isdigit() or not low <= int(text) <= high:
                raise SiteEnvError(f"{path}: {key}={text!r} must be an integer in {low}..{high} ({SITE_KEYS[key]})")
            return int(text)

        workers = an_int("FEDCT_WORKERS", 2, 1, 256)
        runtime_port = an_int("FEDCT_RUNTIME_PORT", 9094, 1, 65535)
        metrics_min_count = an_int("FEDCT_METRICS_MIN_COUNT", 5, 5, 1_000_000)
        approved = _allow_list(values, path, site_dir, a_path)
        try:
            split = SplitConfig(
                val_fraction=_fraction(values, "FEDCT_VAL_FRACTION", path),
                test_fraction=_fraction(values, "FEDCT_TEST_FRACTION", path),
            )
        except ValueError as exc:
            raise SiteEnvError(f"{path}: FEDCT_VAL_FRACTION + FEDCT_TEST_FRACTION: {exc}") from exc
        try:
            limits = SiteLimits.from_env_values(values)
        except ValueError as exc:
            raise SiteEnvError(f"{path}: {exc}") from exc
        try:
            spacing = parse_triple(values.get("FEDCT_INGEST_SPACING") or "5.0,5.0,5.0", float, "FEDCT_INGEST_SPACING")
            size = parse_triple(values.get("FEDCT_INGEST_INPUT_SIZE") or "64,64,48", int, "FEDCT_INGEST_INPUT_SIZE")
        except ValueError as exc:
            raise SiteEnvError(f"{path}: {exc}") from exc
        skip = (values.get("FEDCT_SKIP_INGEST", "") or "false").lower()
        if skip not in ("true", "false", "1", "0", "yes", "no"):
            raise SiteEnvError(f"{path}: FEDCT_SKIP_INGEST={skip!r} must be true or false")
        runner = (values.get("FEDCT_CLIENTAPP_RUNNER", "") or CLIENTAPP_RUNNERS[0]).lower()
        if runner not in CLIENTAPP_RUNNERS:
            raise SiteEnvError(
                f"{path}: FEDCT_CLIENTAPP_RUNNER={runner!r} is not one of {', '.join(CLIENTAPP_RUNNERS)} "
                f"({SITE_KEYS['FEDCT_CLIENTAPP_RUNNER']})"
            )
        try:
            env = cls(
                env_path=path,
                site_name=values["FEDCT_SITE_NAME"],
                superlink_host=host,
                superlink_port=port,
                ca_cert=ca_cert,
                site_key=site_key,
                dicom_dir=dicom_dir,
                site_dir=site_dir,
                labels_csv=labels,
                profile_dir=profile_dir,
                device=device,
                workers=workers,
                runtime_port=runtime_port,
                approved_apps=approved,
                ingest_spacing_mm=spacing,
                ingest_input_size=size,
                skip_ingest=skip in ("true", "1", "yes"),
                clientapp_runner=runner,
                metrics_min_count=metrics_min_count,
                split=split,
                limits=limits,
                compute={node: values[env] for node, (env, _) in COMPUTE_ENV_KEYS.items() if values.get(env)},
                feedback={
                    node: str(a_path(env)) if node == "feedback-db" else values[env].strip().lower()
                    for node, env in FEEDBACK_ENV_KEYS.items()
                    if values.get(env)
                },
                extra={k: v for k, v in values.items() if not k.startswith("FEDCT_")},
            )
            env.site_config()
        except (SiteConfigError, ValueError) as exc:
            raise SiteEnvError(f"{path}: {exc}") from exc
        return env


def _default_profile_dir(labels_csv: Path | None) -> Path | None:
    """The labels file's folder when it holds profile-mapping.toml (the layout of the synthetic sites)."""
    from preprocessing.profile import MAPPING_NAME

    folder = labels_csv.parent if labels_csv is not None else None
    return folder if folder is not None and (folder / MAPPING_NAME).is_file() else None


def _fraction(values: dict[str, str], key: str, path: Path) -> float:
    text = values.get(key, "") or "0.2"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise SiteEnvError(f"{path}: {key}={text!r} must be a number in [0, 1) ({SITE_KEYS[key]})")
    return value


def _inside(child: Path, parent: Path) -> bool:
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents


def _allow_list(values: dict[str, str], path: Path, site_dir: Path, a_path) -> Path | None:  # noqa: ANN001
    """FEDCT_APPROVAL / FEDCT_APPROVED_APPS -> the allow-list file (None only when explicitly disabled)."""
    mode = values.get(APPROVAL_SETTING, "") or APPROVAL_MODES[0]
    if mode not in APPROVAL_MODES:
        raise SiteEnvError(
            f"{path}: {APPROVAL_SETTING}={mode!r} is not one of {', '.join(APPROVAL_MODES)} "
            f"({SITE_KEYS[APPROVAL_SETTING]})"
        )
    if mode == APPROVAL_DISABLED:
        return None
    if "FEDCT_APPROVED_APPS" in values:
        text = values["FEDCT_APPROVED_APPS"]
        if not text.strip():
            raise SiteEnvError(
                f"{path}: FEDCT_APPROVED_APPS is empty; it must name the allow-list file (remove the "
                "line for the default, approved-apps.txt next to this env file). Approval cannot be "
                f"switched off here; only {APPROVAL_SETTING}={APPROVAL_DISABLED} does that"
            )
        try:
            allow_list_from_value(text, source="FEDCT_APPROVED_APPS")
        except ApprovalConfigError as exc:
            raise SiteEnvError(f"{path}: {exc}") from exc
        allow_list = a_path("FEDCT_APPROVED_APPS")
    else:
        allow_list = path.parent.resolve() / "approved-apps.txt"
    if _inside(allow_list, site_dir):
        raise SiteEnvError(
            f"{path}: FEDCT_APPROVED_APPS={allow_list} is inside FEDCT_SITE_DIR={site_dir}, which the "
            "ClientApp can write (an app could approve itself); keep the allow-list outside it, e.g. "
            "next to the env file (read-only in the container)"
        )
    if allow_list.is_dir():
        raise SiteEnvError(f"{path}: FEDCT_APPROVED_APPS={allow_list} is a folder; name the allow-list file")
    return allow_list
