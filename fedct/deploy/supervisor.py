"""Starting, watching and stopping a site's children: the SuperNode (retried while the SuperLink refuses to activate
it) and the warm executor next to it (started once the SuperNode is activated, restarted a bounded number of times,
never outliving it); output relayed into one log; SIGTERM/SIGINT forwarded."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fedct.processes import command_lines, kill_later, stop_process, stop_processes
from fl_client.site_env import SiteEnv

#: Seconds a stopped SuperNode / SuperLink gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 15.0
#: What flower-supernode prints when the SuperLink refuses to activate it (unknown key, or still counted online).
ACTIVATION_REFUSED = b"[code: 2004]"
#: Seconds between attempts while the SuperLink refuses activation.
ACTIVATION_RETRY_S = 10.0
#: What flower-supernode prints once the SuperLink activated it (the warm executor is started then).
ACTIVATED = b"SuperNode ID:"
#: Exit code of ``fedct site`` when the warm executor keeps dying.
EXECUTOR_FAILED = 4
#: The warm executor is restarted at most this many times within :data:`EXECUTOR_RESTART_WINDOW_S`.
EXECUTOR_MAX_RESTARTS = 5
EXECUTOR_RESTART_WINDOW_S = 600.0
#: Pause before restarting an executor that died (a crash loop must not spin).
EXECUTOR_RESTART_DELAY_S = 2.0
#: Seconds the executor gets after SIGTERM (it gives its running ClientApp up to 15 s) before it is killed.
EXECUTOR_STOP_GRACE_S = 20.0
#: Start the executor this long after the Runtime API listens even if the activation line was not seen.
EXECUTOR_START_FALLBACK_S = 30.0
#: Prefix of the executor's lines in the site's output.
EXECUTOR_PREFIX = b"[executor] "


def _relay(stream: Any, refused: threading.Event, activated: threading.Event | None = None) -> None:
    """Copy the SuperNode's output to ours, noting an activation refusal or success."""
    for line in stream:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if ACTIVATION_REFUSED in line:
            refused.set()
        if activated is not None and ACTIVATED in line:
            activated.set()


def relay_prefixed(stream: Any, prefix: bytes) -> None:
    """Copy a child's output to ours, every line prefixed (one log for hospital IT)."""
    for line in stream:
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


def port_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class ExecutorSupervisor:
    """Runs the warm executor next to one SuperNode process.

    Started once the SuperNode's Runtime API listens and the SuperLink activated it (not while activation is
    refused: each start imports torch/MONAI), output relayed with :data:`EXECUTOR_PREFIX`, restarted when it dies
    while the SuperNode runs (at most :data:`EXECUTOR_MAX_RESTARTS` in :data:`EXECUTOR_RESTART_WINDOW_S`; then the
    SuperNode is stopped and :attr:`failed` is set), and stopped with :meth:`stop` (SIGTERM, bounded wait, SIGKILL).
    """

    def __init__(
        self,
        site: SiteEnv,
        command: Sequence[str],
        env: Mapping[str, str],
        supernode: subprocess.Popen,
        activated: threading.Event,
    ) -> None:
        self.site = site
        self.command = list(command)
        self.env = dict(env)
        self.supernode = supernode
        self.activated = activated
        self.failed = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="fedct-executor-supervisor", daemon=True)

    def _say(self, text: str, *, error: bool = False) -> None:
        print(f"fedct site {self.site.site_name}: {text}", file=sys.stderr if error else sys.stdout, flush=True)

    def start(self) -> None:
        """Begin supervising (in a thread): wait for the SuperNode, start the executor, restart it when it dies."""
        self._thread.start()

    def _supernode_alive(self) -> bool:
        return self.supernode.poll() is None and not self._stopped.is_set()

    def _wait_until_ready(self) -> bool:
        while self._supernode_alive() and not port_listening(self.site.runtime_port):
            self._stopped.wait(0.5)
        listening_since = time.monotonic()
        while self._supernode_alive() and not self.activated.is_set():
            if time.monotonic() - listening_since >= EXECUTOR_START_FALLBACK_S:
                break
            self._stopped.wait(0.5)
        return self._supernode_alive()

    def _launch(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stopped.is_set():
                return None
            self._say(f"starting the warm executor: {' '.join(self.command)}")
            proc = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self.proc = proc
        reader = threading.Thread(target=relay_prefixed, args=(proc.stdout, EXECUTOR_PREFIX), daemon=True)
        reader.start()
        self._readers.append(reader)
        return proc

    def _run(self) -> None:
        if not self._wait_until_ready():
            return
        restarts: list[float] = []
        while True:
            proc = self._launch()
            if proc is None:
                return
            while proc.poll() is None and not self._stopped.is_set():
                self._stopped.wait(0.5)
            if self._stopped.is_set() or self.supernode.poll() is not None:
                return  # stop() ends it; a SuperNode that ended is handled by run_supernode
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < EXECUTOR_RESTART_WINDOW_S] + [now]
            if len(restarts) > EXECUTOR_MAX_RESTARTS:
                self._say(
                    f"error: the warm executor (ClientApp runner) exited unexpectedly (code {proc.returncode}) "
                    f"{len(restarts)} times within {EXECUTOR_RESTART_WINDOW_S / 60:.0f} min; stopping the site. "
                    "Read the [executor] lines above; FEDCT_CLIENTAPP_RUNNER=flower runs ClientApps in Flower's "
                    "SuperExec instead.",
                    error=True,
                )
                self.failed.set()
                if self.supernode.poll() is None:
                    self.supernode.terminate()
                    kill_later(self.supernode, STOP_GRACE_S)
                return
            self._say(
                f"WARNING the warm executor exited unexpectedly (code {proc.returncode}) while the SuperNode runs; "
                f"restarting it ({len(restarts)} of {EXECUTOR_MAX_RESTARTS} restarts allowed per "
                f"{EXECUTOR_RESTART_WINDOW_S / 60:.0f} min)"
            )
            self._stopped.wait(EXECUTOR_RESTART_DELAY_S)
            if not self._supernode_alive():
                return

    def stop(self) -> None:
        """Stop the executor (SIGTERM: its ClientApp children report their tasks as stopped; SIGKILL after
        :data:`EXECUTOR_STOP_GRACE_S`) and the supervision; safe to call more than once, from any thread."""
        with self._lock:
            self._stopped.set()
            proc = self.proc
        if proc is not None:
            stop_process(proc, grace_s=EXECUTOR_STOP_GRACE_S)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)


def _stop_orphans(parent_pid: int) -> None:
    """Stop the processes started with ``--parent-pid PARENT_PID`` (Flower's SuperExec of a SuperNode that ended)."""
    needle = [b"--parent-pid", str(parent_pid).encode()]
    orphans = [pid for pid, argv in command_lines() if any(argv[i : i + 2] == needle for i in range(len(argv) - 1))]
    stop_processes(orphans, grace_s=STOP_GRACE_S)


def run_supernode(
    site: SiteEnv,
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    activation_wait_s: float,
    executor: Sequence[str] | None = None,
) -> int:
    """Run the SuperNode in the foreground (output passed through, SIGTERM/SIGINT forwarded); returns its exit code.

    A SuperNode that was killed stays "online" at the SuperLink until its heartbeats expire (2 x 30 s), and a restart
    within that time is refused activation (code 2004), as is a key the server never registered. Such a refusal is
    retried every 10 s for ``activation_wait_s``; then the site stops with a message saying what to check.

    ``executor``: the warm executor's command line (:func:`executor_command`), run next to each SuperNode by an
    :class:`ExecutorSupervisor` with the same environment; it is stopped before the SuperNode on SIGTERM/SIGINT and
    whenever the SuperNode ends (so an activation retry starts a fresh one with the new SuperNode).
    """
    stopping: list[int] = []
    current: list[subprocess.Popen] = []
    supervisors: list[ExecutorSupervisor] = []

    def shutdown(signum: int) -> None:
        if supervisors:  # the executor first: its running ClientApp reports the task as stopped to the SuperNode
            supervisors[0].stop()
        if current and current[0].poll() is None:
            current[0].send_signal(signum)
            # Flower's SuperNode tries to deregister on SIGTERM and retries while the SuperLink is gone: bound it.
            kill_later(current[0], STOP_GRACE_S)

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        threading.Thread(target=shutdown, args=(signum,), name="fedct-site-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    deadline = time.monotonic() + activation_wait_s
    while True:
        if stopping:
            return 0
        print(f"fedct site {site.site_name}: starting {' '.join(command)}", flush=True)
        proc = subprocess.Popen(list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        current[:] = [proc]
        refused, activated = threading.Event(), threading.Event()
        reader = threading.Thread(target=_relay, args=(proc.stdout, refused, activated), daemon=True)
        reader.start()
        supervisor = None
        if executor is not None:
            supervisor = ExecutorSupervisor(site, executor, env, proc, activated)
            supervisors[:] = [supervisor]
            if stopping:
                shutdown(stopping[0])
            supervisor.start()
        code = proc.wait()
        if supervisor is not None:
            supervisor.stop()  # never outlives its SuperNode
        _stop_orphans(proc.pid)  # its SuperExec would otherwise linger (and keep the output pipe open)
        reader.join(timeout=5)
        if supervisor is not None and supervisor.failed.is_set():
            return EXECUTOR_FAILED
        if stopping:
            return 0
        if not refused.is_set():
            return code
        if time.monotonic() >= deadline:
            print(
                f"fedct site {site.site_name}: error: the SuperLink at {site.superlink} refused to activate this site "
                f"(code 2004) for {activation_wait_s:.0f} s. Check that the server registered this site's public key "
                f"(the .pub of FEDCT_SITE_KEY={site.site_key} in the server's FEDCT_SITE_KEYS; `fedct server start` "
                "registers it), and that no other SuperNode runs with the same key.",
                file=sys.stderr,
                flush=True,
            )
            return 3
        print(
            f"fedct site {site.site_name}: the SuperLink refused activation (code 2004): a previous instance of this "
            "site may still count as online (freed within 60 s of its last heartbeat), or the key is not registered; "
            f"retrying in {ACTIVATION_RETRY_S:.0f} s",
            flush=True,
        )
        time.sleep(ACTIVATION_RETRY_S)
