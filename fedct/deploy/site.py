"""A hospital's site: ``fedct site`` (TLS preflight, ingestion, the approval launcher, then the SuperNode and the
warm executor under :mod:`fedct.deploy.supervisor`) and the /proc look-ups of ``fedct site --health``."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from fedct.deploy.commands import executor_command, supernode_command, supernode_env
from fedct.deploy.supervisor import run_supernode
from fedct.deploy.tls import wait_for_tls
from fedct.files import atomic_write_bytes
from fedct.processes import command_lines, parent_pid
from fl_client.site_env import SiteEnv


def ensure_superexec_secret(site: SiteEnv) -> Path:
    """Create the SuperNode/executor shared secret once (random, mode 0600 in a 0700 folder); reuse it after."""
    path = site.superexec_secret_file
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    if path.is_file() and path.stat().st_size > 0:
        path.chmod(0o600)
        return path
    return atomic_write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)


def ingest(site: SiteEnv) -> str:
    """Run ingestion (validation, HU, preprocessing cache) for the site; returns a one-line summary."""
    from preprocessing.ingest import REPORT_NAME, ingest_site
    from preprocessing.transforms import PipelineConfig

    pipeline = PipelineConfig(target_spacing_mm=site.ingest_spacing_mm, input_size=site.ingest_input_size)
    from preprocessing.split import site_split

    split = site_split(site.site_dir, site_choice=site.split)  # the site's own, fixed split (FEDCT_VAL/TEST_FRACTION)
    ingest_site(
        site.dicom_dir,
        site.site_dir,
        labels_csv=site.labels_csv,
        pipeline=pipeline,
        workers=site.workers,
        split=split,
        progress=False,
    )
    counts = json.loads((site.site_dir / REPORT_NAME).read_text())["counts"]
    return f"accepted {counts['accepted']} series, rejected {counts['rejected']}, splits {counts['by_split']}"


def executor_pids(runtime_port: int) -> list[int]:
    """PIDs of warm executors serving the SuperNode whose Runtime API is on ``runtime_port`` (not their children)."""
    address = f"127.0.0.1:{runtime_port}".encode()
    found = [pid for pid, argv in command_lines() if b"fl_client.executor" in argv[:3] and address in argv]
    executors = set(found)
    return [
        pid for pid in found if parent_pid(pid) not in executors
    ]  # a forked ClientApp child has the same command line


def supernode_pids(site_name: str | None = None) -> list[int]:
    """PIDs of running flower-supernode processes (of one site when ``site_name`` is given)."""
    wanted = f'site-name="{site_name}"'.encode()
    return [
        pid
        for pid, argv in command_lines()
        if any(a.endswith(b"flower-supernode") for a in argv[:2])
        and (site_name is None or any(wanted in a for a in argv))
    ]


def start_site(site: SiteEnv, *, wait_s: float, ingest_first: bool = True, activation_wait_s: float = 120.0) -> int:
    """Preflight TLS, ingest, install the approval launcher, then run ``flower-supernode`` (and, with the warm
    runner, the warm executor); returns the exit code."""
    from fl_client.approval import allow_list_exposure, disabled_warning, install_gate, load_allow_list

    print(f"fedct site {site.site_name}: checking TLS to {site.superlink} against {site.ca_cert}", flush=True)
    version = wait_for_tls(site.superlink_host, site.superlink_port, site.ca_cert, wait_s=wait_s)
    print(f"fedct site {site.site_name}: SuperLink certificate verified ({version})", flush=True)
    if ingest_first and not site.skip_ingest:
        print(f"fedct site {site.site_name}: ingesting {site.dicom_dir} into {site.site_dir}", flush=True)
        print(f"fedct site {site.site_name}: {ingest(site)}", flush=True)
    gate_dir = site.site_dir / "bin"
    install_gate(gate_dir)
    if site.approved_apps is None:
        print(f"fedct site {site.site_name}: {disabled_warning()}", flush=True)
    else:
        if (exposure := allow_list_exposure(site.approved_apps)) is not None:
            print(f"fedct site {site.site_name}: {exposure}", flush=True)
        approved = load_allow_list(site.approved_apps)
        print(
            f"fedct site {site.site_name}: {len(approved)} approved app(s) in {site.approved_apps}"
            + ("" if approved else "; every run will be refused until an app is approved (--approve APP_DIR)"),
            flush=True,
        )
    site.flwr_home.mkdir(parents=True, exist_ok=True)
    executor = None
    if site.clientapp_runner == "warm":
        ensure_superexec_secret(site)
        executor = executor_command(site, parent_pid=os.getpid())
        print(
            f"fedct site {site.site_name}: ClientApps run in fedct's warm executor (FEDCT_CLIENTAPP_RUNNER=warm)",
            flush=True,
        )
    else:
        print(
            f"fedct site {site.site_name}: ClientApps run in Flower's SuperExec (FEDCT_CLIENTAPP_RUNNER=flower)",
            flush=True,
        )
    return run_supernode(
        site,
        supernode_command(site),
        supernode_env(site, gate_dir),
        activation_wait_s=activation_wait_s,
        executor=executor,
    )
