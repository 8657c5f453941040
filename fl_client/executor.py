"""Warm site executor: fedct's replacement for ``flower-superexec`` at a site.

Flower's SuperExec starts a *new* ``flwr-clientapp`` process for every message; that process imports
Flower, torch and MONAI before it can train (about 11 s per message on 2 cores). This executor is a
resident process that imports the heavy third-party libraries once, then, for every task it acquires
from the SuperNode's Runtime API (SuperNode started with ``--isolation process``), forks a child that
runs Flower's own ``run_clientapp`` — the same code ``flwr-clientapp`` runs, on the same task token. The
child installs the run's FAB and loads the ClientApp from it, so the code that trains is still the run's
FAB; only the third-party modules come already imported.

Rules that keep forking safe:

- the parent imports only installed third-party packages (``site-packages``), never the project's own
  packages (:func:`project_packages`: every top-level package of the installed ``fedct`` distribution or of the
  source tree's ``pyproject.toml``), in every install layout — a non-editable install puts them in
  ``site-packages`` too, and a preloaded copy would run instead of the approved app; and it does no torch compute
  (no thread pools, no CUDA context before ``fork``);
- the child forgets the project's modules before the task, and again, after the FAB is unpacked, every module
  named like a top-level package of the FAB (:func:`fl_client.approval.forget_app_modules`), so the app's code is
  imported from the FAB;
- the parent stays single-threaded: children are reaped with ``waitpid(WNOHANG)`` in the poll loop;
- a child never returns into the parent's loop: it ends with ``os._exit`` whatever happens, and it does
  not touch the parent's Runtime API connection.

Nothing patient-related is loaded in the parent. ``--parent-pid PID`` (as Flower's SuperExec has) ends the
executor and its children once that process is gone: ``fedct site`` passes its own PID, so the executor never
outlives the site, even when the site is killed with SIGKILL. Usage (``fedct site`` does this when
``FEDCT_CLIENTAPP_RUNNER=warm``)::

    flower-supernode --isolation process --port 9094 ...   # no flower-superexec is started
    python -m fl_client.executor --runtime-api-address 127.0.0.1:9094 --insecure --approved-apps FILE
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn

from fedct.processes import end_with_parent, process_alive, stop_processes

log = logging.getLogger("fedct.executor")

#: The ClientApp whose third-party imports are preloaded by default (the one in pyproject.toml).
DEFAULT_PRELOAD_APP = "fl_client.client_app"
#: Flower modules every ClientApp process imports.
FLOWER_MODULES = ("flwr.supernode.runtime.run_clientapp", "flwr.clientapp", "flwr.app")
MIN_POLL_INTERVAL_S = 0.01
MAX_POLL_INTERVAL_S = 60.0
#: Seconds between checks that the ``--parent-pid`` process is still there (also while a Runtime API call retries).
PARENT_CHECK_S = 1.0

_DISCOVER = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
own = set(json.loads(sys.argv[2]))
print(json.dumps([n for n, m in list(sys.modules.items())
                  if n.split('.')[0] not in own
                  and any(p in (getattr(m, '__file__', None) or '') for p in ('site-packages', 'dist-packages'))]))
"""


class ExecutorConfigError(ValueError):
    """An executor setting is wrong; the message names the setting."""


@dataclass(frozen=True)
class ExecutorConfig:
    """How the warm executor reaches the SuperNode and what it preloads."""

    runtime_api_address: str
    insecure: bool = False
    root_certificates: Path | None = None
    superexec_auth_secret_file: Path | None = None
    poll_interval_s: float = 0.2
    max_concurrent: int = 1
    preload_app: str | None = DEFAULT_PRELOAD_APP
    preload: tuple[str, ...] = field(default_factory=tuple)
    #: The site's allow-list of app hashes (fl_client.approval); None only when explicitly turned off.
    approved_apps: Path | None = None
    #: Exit (stopping the children) once this process is gone; None: run until SIGTERM/SIGINT.
    parent_pid: int | None = None

    def __post_init__(self) -> None:
        host, sep, port = self.runtime_api_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ExecutorConfigError(f"--runtime-api-address {self.runtime_api_address!r} must be HOST:PORT")
        if self.insecure and self.root_certificates is not None:
            raise ExecutorConfigError("--insecure and --root-certificates exclude each other")
        if not self.insecure and self.root_certificates is None:
            raise ExecutorConfigError("give --root-certificates (the Runtime API's CA) or --insecure")
        for name, path in (
            ("--root-certificates", self.root_certificates),
            ("--superexec-auth-secret-file", self.superexec_auth_secret_file),
        ):
            if path is not None and not path.is_file():
                raise ExecutorConfigError(f"{name} {path}: no such file")
        if not MIN_POLL_INTERVAL_S <= self.poll_interval_s <= MAX_POLL_INTERVAL_S:
            raise ExecutorConfigError(
                f"--poll-interval {self.poll_interval_s} must be between {MIN_POLL_INTERVAL_S} and {MAX_POLL_INTERVAL_S} s"
            )
        if self.max_concurrent < 1:
            raise ExecutorConfigError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.parent_pid is not None and self.parent_pid < 1:
            raise ExecutorConfigError(f"--parent-pid must be a process id (>= 1), got {self.parent_pid}")


@dataclass(frozen=True)
class PreloadResult:
    """What the parent imported before serving tasks."""

    imported: int
    skipped: int
    seconds: float
    threads: int


def project_packages() -> frozenset[str]:
    """Top-level import names of this project, whatever the install layout.

    The union of: this package's own name; every top-level package of the installed distribution that provides it
    (wheel, ``pip install --target``, editable; from its metadata); and the ``[tool.setuptools] packages`` of the
    ``pyproject.toml`` next to it when run from a source tree.
    """
    import importlib.metadata
    import importlib.util

    own = _own_package()
    names = {own}
    try:
        tops = importlib.metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - broken metadata elsewhere on sys.path: fall back to the source tree
        tops = {}
    ours = set(tops.get(own, ()))
    names.update(top for top, dists in tops.items() if ours & set(dists) and top.isidentifier())
    spec = importlib.util.find_spec(own)
    for location in (spec.submodule_search_locations or []) if spec else []:
        pyproject = Path(location).resolve().parent / "pyproject.toml"
        if pyproject.is_file():
            import tomllib

            try:
                config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                continue
            packages = config.get("tool", {}).get("setuptools", {}).get("packages", [])
            if own in {str(p).split(".")[0] for p in packages}:
                names.update(str(p).split(".")[0] for p in packages)
    return frozenset(names)


def discover_third_party_modules(app_module: str, *, timeout_s: float = 300.0) -> list[str]:
    """Installed third-party modules that importing ``app_module`` loads, in import order.

    The app module is imported in a short-lived separate process, so none of its code runs in the executor. Modules
    of the project's own packages (:func:`project_packages`) and of the app module's own top-level package are
    never listed, also when they are installed in ``site-packages``.
    """
    own = sorted(project_packages() | {app_module.split(".")[0]})
    done = subprocess.run(
        [sys.executable, "-c", _DISCOVER, app_module, json.dumps(own)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise ExecutorConfigError(f"--preload-app {app_module!r} could not be imported: {done.stderr.strip()[-2000:]}")
    return [str(n) for n in json.loads(done.stdout.strip().splitlines()[-1])]


def preload_modules(names: list[str] | tuple[str, ...], *, exclude: frozenset[str] | None = None) -> PreloadResult:
    """Import ``names`` (modules that cannot be imported by name, e.g. extension internals, are skipped). Names under
    a top-level package in ``exclude`` (default: :func:`project_packages`) are never imported, only counted skipped."""
    exclude = project_packages() if exclude is None else exclude
    t0 = time.perf_counter()
    imported = skipped = 0
    for name in names:
        if name.split(".")[0] in exclude:
            skipped += 1
            continue
        if name in sys.modules:
            imported += 1
            continue
        try:
            importlib.import_module(name)
            imported += 1
        except Exception:  # noqa: BLE001 - a module that cannot be preloaded is imported by the child instead
            skipped += 1
    return PreloadResult(
        imported=imported, skipped=skipped, seconds=time.perf_counter() - t0, threads=threading.active_count()
    )


def _own_package() -> str:
    """``fl_client`` also when run as ``python -m fl_client.executor`` (``__name__`` is then ``__main__``)."""
    return (__package__ or __name__).split(".")[0]


def _forget_own_modules() -> None:
    """Drop the project's modules (imported to run the executor) so the child imports the FAB's copy."""
    from fl_client.approval import forget_modules

    forget_modules(project_packages())


def _run_child(config: ExecutorConfig, token: str, certificates: bytes | None, *, executor: int) -> NoReturn:
    """In the forked child: run exactly one task with Flower's ``run_clientapp``, then ``os._exit``.

    The child ends with its executor (``executor``: the parent's PID): an executor killed outright (SIGKILL, the
    OOM killer) cannot stop its children, and Flower's own parent check polls for a PID that an unreaped zombie
    still holds, so without the kernel's parent-death signal an orphaned child would train on unseen."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, 0)  # not inherited on Linux; explicit elsewhere
        if not end_with_parent(executor) and os.getppid() != executor:
            print(f"executor {executor} ended before its ClientApp child started; the child stops", file=sys.stderr)
            os._exit(1)
        from fl_client.approval import gate_fab_install  # the site's installed check, before any app code

        gate_fab_install(config.approved_apps)  # also forgets the FAB's top-level modules once it is unpacked
        _forget_own_modules()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()  # a fresh process would have its own global numpy state
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=config.runtime_api_address,
            token=token,
            insecure=config.insecure,
            certificates=certificates,
            parent_pid=os.getppid(),
            runtime_dependency_install=False,
        )
    except SystemExit as stop:  # run_clientapp always ends with flwr_exit -> sys.exit
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, never return into the parent's loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os._exit(code)  # unreachable; keeps type checkers honest


class ExecutorAuthError(RuntimeError):
    """The SuperNode refused task acquisition: the shared secret is missing or not the SuperNode's."""


class _StopRequested(BaseException):
    """Raised by the signal handler to leave a blocking Runtime API call or the preloading (not an ``Exception``:
    the per-module ``except Exception`` of :func:`preload_modules` must not swallow it)."""


@dataclass
class _Child:
    task_id: int
    started: float


class WarmExecutor:
    """Acquire ClientApp tasks from a SuperNode's Runtime API and run each in a forked warm child."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.children: dict[int, _Child] = {}
        self.exit_codes: list[tuple[int, int]] = []
        self._stop = False
        self._in_call = False
        self._certificates = config.root_certificates.read_bytes() if config.root_certificates else None
        #: Started by the parent process itself: its death also shows as a new parent (re-parenting).
        self._direct_child = config.parent_pid is not None and os.getppid() == config.parent_pid

    def request_stop(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Stop acquiring tasks; running children are asked to stop too."""
        self._stop = True
        if self._in_call:  # a Runtime API call may be retrying against a SuperNode that is gone
            raise _StopRequested

    def parent_gone(self) -> bool:
        """True once the ``--parent-pid`` process has ended (never without one)."""
        pid = self.config.parent_pid
        if pid is None:
            return False
        return (self._direct_child and os.getppid() != pid) or not process_alive(pid)

    def _check_parent(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """SIGALRM handler: stop when the parent is gone, also while a Runtime API call is retrying."""
        if not self._stop and self.parent_gone():
            log.warning(
                "parent process %d is gone; stopping the executor and its ClientApp children", self.config.parent_pid
            )
            self.request_stop()

    def _client(self):  # noqa: ANN202 - Flower's RuntimeHttpClient
        from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        secret_file = self.config.superexec_auth_secret_file
        secret = load_superexec_auth_secret(str(secret_file)) if secret_file else None
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})
                )
            )
        invoker = make_simple_http_retry_invoker()
        flower_giveup = invoker.should_giveup

        def should_giveup(exc: Exception) -> bool:
            # Flower's invoker answers HTTP 401 by sending SIGINT to its own process (a silent clean exit here):
            # give up instead, so serve() can say that the secret is wrong.
            status = getattr(getattr(exc, "response", None), "status_code", None)
            return status == 401 or (flower_giveup(exc) if flower_giveup else False)

        invoker.should_giveup = should_giveup
        return RuntimeHttpClient.from_server_address(
            server_address=self.config.runtime_api_address,
            insecure=self.config.insecure,
            root_certificates=self._certificates,
            interceptors=interceptors,
            retry_invoker=invoker,
        )

    def reap(self) -> None:
        """Collect finished children and log how they ended."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if child is None:
                continue
            self.exit_codes.append((child.task_id, code))
            level = logging.INFO if code == 0 else logging.WARNING
            log.log(
                level,
                "task %d: ClientApp child %d exited with code %d after %.1fs",
                child.task_id,
                pid,
                code,
                time.monotonic() - child.started,
            )

    def launch(self, token: str, task_id: int) -> int:
        """Fork one child for the task; returns its PID."""
        sys.stdout.flush()
        sys.stderr.flush()
        executor = os.getpid()
        pid = os.fork()
        if pid == 0:
            _run_child(self.config, token, self._certificates, executor=executor)
        self.children[pid] = _Child(task_id=task_id, started=time.monotonic())
        log.info("task %d: ClientApp child %d started", task_id, pid)
        return pid

    def serve(self) -> None:
        """Poll for tasks until asked to stop, then stop the children (:class:`ExecutorAuthError`: secret refused)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        client = self._client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        if self.config.parent_pid is not None:  # a timer signal, not a thread: the parent must stay single-threaded
            signal.signal(signal.SIGALRM, self._check_parent)
            signal.setitimer(signal.ITIMER_REAL, PARENT_CHECK_S, PARENT_CHECK_S)
        try:
            while not self._stop:
                self._check_parent()
                if self._stop:
                    break
                self.reap()
                if len(self.children) < self.config.max_concurrent:
                    self._in_call = True
                    try:
                        response = client.AcquireTask(request)
                    except Exception as exc:
                        if getattr(getattr(exc, "response", None), "status_code", None) == 401:
                            raise ExecutorAuthError(
                                f"the SuperNode at {self.config.runtime_api_address} refused task acquisition (HTTP 401, "
                                "SuperExec authentication failed): give --superexec-auth-secret-file the SuperNode's own "
                                "secret file"
                            ) from exc
                        raise
                    finally:
                        self._in_call = False
                    if response.HasField("task") and response.token:
                        self.launch(response.token, response.task.task_id)
                        continue  # look for the next task at once
                time.sleep(self.config.poll_interval_s)
        except _StopRequested:
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            client.close()
            self.stop_children()

    def stop_children(self, *, timeout_s: float = 15.0) -> None:
        """SIGTERM the running children (Flower's handler reports the task as stopped), SIGKILL after a grace."""
        stop_processes(list(self.children), grace_s=timeout_s)  # a zombie counts as ended; reaped (and logged) below
        while self.children:
            self.reap()
            time.sleep(0.01)


def parse_args(argv: list[str] | None = None) -> ExecutorConfig:
    """Command line -> :class:`ExecutorConfig` (errors name the option)."""
    parser = argparse.ArgumentParser(prog="python -m fl_client.executor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (its --port)"
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument(
        "--root-certificates", type=Path, help="CA certificate of the Runtime API (SuperNode --ssl-ca-certfile)"
    )
    parser.add_argument("--superexec-auth-secret-file", type=Path, help="same file as the SuperNode's, when it has one")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.2,
        help="seconds between task polls (default 0.2; each poll costs ~4 ms CPU)",
    )
    parser.add_argument("--max-concurrent", type=int, default=1, help="ClientApp children at a time (default 1)")
    parser.add_argument(
        "--preload-app",
        default=DEFAULT_PRELOAD_APP,
        help="ClientApp module whose installed third-party imports are preloaded ('' for none)",
    )
    parser.add_argument("--preload", action="append", default=[], help="extra module to preload (repeatable)")
    parser.add_argument(
        "--parent-pid",
        type=int,
        help="exit, stopping the running ClientApps, once this process is gone (fedct site passes its PID)",
    )
    parser.add_argument(
        "--approved-apps",
        metavar="FILE",
        help="allow-list of app (FAB) hashes checked before each task's app is unpacked "
        "(default: $FEDCT_APPROVED_APPS; none set: every app is refused; "
        "'disabled-i-understand': no check, a WARNING for every task)",
    )
    args = parser.parse_args(argv)
    from fl_client.approval import ALLOW_LIST_ENV, ApprovalConfigError, allow_list_from_value

    try:
        approved = allow_list_from_value(
            args.approved_apps if args.approved_apps is not None else os.environ.get(ALLOW_LIST_ENV, ""),
            source="--approved-apps" if args.approved_apps is not None else ALLOW_LIST_ENV,
        )
    except ApprovalConfigError as err:
        parser.error(str(err))
    try:
        return ExecutorConfig(
            runtime_api_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates=args.root_certificates,
            superexec_auth_secret_file=args.superexec_auth_secret_file,
            poll_interval_s=args.poll_interval,
            max_concurrent=args.max_concurrent,
            preload_app=args.preload_app or None,
            preload=tuple(args.preload),
            approved_apps=approved,
            parent_pid=args.parent_pid,
        )
    except ExecutorConfigError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    """Entry point: validate, preload, serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request otherwise
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; the root handler would print them twice
    config = parse_args(argv)
    from fl_client.approval import allow_list_exposure, disabled_warning

    if config.approved_apps is None:
        log.warning("%s", disabled_warning())
    elif (exposure := allow_list_exposure(config.approved_apps)) is not None:
        log.warning("%s", exposure)
    executor = WarmExecutor(config)
    signal.signal(signal.SIGTERM, executor.request_stop)
    signal.signal(signal.SIGINT, executor.request_stop)
    names = [*FLOWER_MODULES, *config.preload]
    executor._in_call = True  # SIGTERM during the (slow) preloading ends it at once, discovery process included
    try:
        if config.preload_app:
            names += discover_third_party_modules(config.preload_app)
        result = preload_modules(names)
    except ExecutorConfigError as err:
        log.error("%s", err)
        return 2
    except _StopRequested:
        log.info("stopped while preloading")
        return 0
    finally:
        executor._in_call = False
    log.info(
        "preloaded %d modules in %.1fs (%d not importable by name); %d thread(s); serving %s",
        result.imported,
        result.seconds,
        result.skipped,
        result.threads,
        config.runtime_api_address,
    )
    if result.threads > 1:
        log.warning("preloading started %d threads; forking with threads may deadlock a child", result.threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.error("a preloaded module initialised CUDA; a forked child cannot use it. Preload fewer modules.")
        return 2
    try:
        executor.serve()
    except ExecutorAuthError as err:
        log.error("%s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
