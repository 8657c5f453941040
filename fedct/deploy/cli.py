"""``fedct server start|submit|check`` and ``fedct site``: argument parsing and exit codes; the work is in
:mod:`fedct.deploy.server` and :mod:`fedct.deploy.site`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedct.deploy.common import DeployError
from fedct.deploy.server import start_server, submit_run
from fedct.deploy.server_env import ServerEnv
from fedct.deploy.site import executor_pids, start_site, supernode_pids
from fedct.deploy.tls import check_tls
from fl_client.site_env import SiteEnv, SiteEnvError


def add_server_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct server start|submit|check``."""
    p = sub.add_parser("server", help="consortium server: start the SuperLink, submit runs, health check")
    server_sub = p.add_subparsers(dest="server_command", required=True)
    s = server_sub.add_parser(
        "start",
        help="start the SuperLink (127.0.0.1, TLS, node auth), register the sites' keys, "
        "then the hospital-facing proxy (Fleet API only)",
    )
    s.add_argument("--env", required=True, help="server env file (configs/server.env)")
    s.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the SuperLink to answer")
    s.add_argument("--log-file", help="write the SuperLink's output here instead of the console")
    s.set_defaults(func=_server_start)
    s = server_sub.add_parser("submit", help="start a federated run on the SuperLink")
    s.add_argument("--env", required=True, help="server env file")
    s.add_argument("--config", required=True, help="run config TOML (configs/run.toml)")
    s.add_argument("--app", help="app folder to send (default FEDCT_APP_DIR or this installation)")
    s.add_argument("--no-stream", action="store_true", help="return once the run is submitted")
    s.set_defaults(func=_server_submit)
    s = server_sub.add_parser(
        "check", help="exit 0 when the proxy and the SuperLink answer TLS handshakes verified by the CA"
    )
    s.add_argument("--env", required=True, help="server env file")
    s.set_defaults(func=_server_check)


def add_site_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct site``."""
    p = sub.add_parser("site", help="site: validate the env file, ingest, run the SuperNode (or approve an app)")
    p.add_argument(
        "--env", default=os.environ.get("FEDCT_ENV"), help="site env file (configs/site.env; default $FEDCT_ENV)"
    )
    p.add_argument("--check", action="store_true", help="validate the env file and the TLS connection, then exit")
    p.add_argument("--health", action="store_true", help="exit 0 when the env file is valid and a SuperNode is running")
    p.add_argument("--approve", metavar="APP_DIR", help="add this app's FAB hash to the site's allow-list and exit")
    p.add_argument("--no-ingest", action="store_true", help="start without ingesting first")
    p.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the SuperLink to answer")
    p.add_argument(
        "--activation-wait-s",
        type=float,
        default=120.0,
        help="how long to retry when the SuperLink refuses to activate this site (e.g. right after a crash)",
    )
    p.set_defaults(func=_site)


def _server_start(args: argparse.Namespace) -> int:
    try:
        env = ServerEnv.from_file(Path(args.env))
    except DeployError as exc:
        print(f"fedct server: error: {exc}", file=sys.stderr)
        return 2
    return start_server(env, wait_s=args.wait_s, log_file=Path(args.log_file) if args.log_file else None)


def _server_submit(args: argparse.Namespace) -> int:
    try:
        env = ServerEnv.from_file(Path(args.env))
        done = submit_run(
            env, Path(args.config), app_dir=Path(args.app) if args.app else None, stream=not args.no_stream
        )
    except (DeployError, ConnectionError) as exc:
        print(f"fedct server submit: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(done.output)
    print(
        f"fedct server submit: run {done.run_id}: {done.status}{' - ' + done.details if done.details and not done.ok else ''}"
    )
    return 0 if done.ok else 1


def _server_check(args: argparse.Namespace) -> int:
    try:
        env = ServerEnv.from_file(Path(args.env))
        host, _, port = env.address.rpartition(":")
        version = check_tls(host.strip("[]"), int(port), env.ca_cert)
        inner = check_tls("127.0.0.1", env.superlink_port, env.ca_cert)
    except (DeployError, ConnectionError) as exc:
        print(f"fedct server check: {exc}", file=sys.stderr)
        return 1
    print(
        f"hospital-facing proxy {env.address}: TLS {version}, certificate verified; "
        f"SuperLink 127.0.0.1:{env.superlink_port}: TLS {inner}"
    )
    return 0


def _site_health(site: SiteEnv) -> int:
    """0 when the site's SuperNode runs (and, with the warm runner, its executor); one line says what was found."""
    nodes = supernode_pids(site.site_name)
    parts = [f"SuperNode {'running (pid ' + ', '.join(map(str, nodes)) + ')' if nodes else 'NOT running'}"]
    healthy = bool(nodes)
    if site.clientapp_runner == "warm":
        executors = executor_pids(site.runtime_port)
        parts.append(
            f"warm executor {'running (pid ' + ', '.join(map(str, executors)) + ')' if executors else 'NOT running'}"
        )
        healthy = healthy and bool(executors)
    print(f"fedct site {site.site_name}: {'; '.join(parts)}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def _site(args: argparse.Namespace) -> int:
    if not args.env:
        print("fedct site: error: --env is required (or set FEDCT_ENV)", file=sys.stderr)
        return 2
    try:
        site = SiteEnv.from_file(Path(args.env), check_cuda=not args.health)
    except SiteEnvError as exc:
        print(f"fedct site: error: {exc}", file=sys.stderr)
        return 2
    if args.health:
        return _site_health(site)
    if args.approve:
        from fl_client.approval import approve

        if site.approved_apps is None:
            print(
                "fedct site: error: FEDCT_APPROVAL=disabled-i-understand; set FEDCT_APPROVED_APPS to a file to approve apps",
                file=sys.stderr,
            )
            return 2
        try:
            digest = approve(Path(args.approve), site.approved_apps)
        except (OSError, ValueError) as exc:
            print(f"fedct site: error: {exc}", file=sys.stderr)
            return 2
        print(f"approved {args.approve}: FAB sha256 {digest} (in {site.approved_apps})")
        return 0
    try:
        if args.check:
            version = check_tls(site.superlink_host, site.superlink_port, site.ca_cert)
            print(
                f"fedct site {site.site_name}: env file valid; SuperLink {site.superlink} TLS {version}, certificate verified"
            )
            return 0
        return start_site(
            site, wait_s=args.wait_s, ingest_first=not args.no_ingest, activation_wait_s=args.activation_wait_s
        )
    except (DeployError, ConnectionError) as exc:
        print(f"fedct site {site.site_name}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"fedct site {site.site_name}: error: {exc}", file=sys.stderr)
        return 2
