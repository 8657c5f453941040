"""The one way fedct stops processes: by PID (or process group), SIGTERM, a bounded wait, then SIGKILL.

Used by the deployment supervisor (``fedct server start``, ``fedct site``), the warm executor's ClientApp children,
the local deployment of the benchmarks and the tests. Also the /proc look-ups they share (who is alive, which
processes carry a string on their command line, a process's descendants). Linux only (/proc), as the images are.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: What happened to one stopped process (or group).
GONE = "already gone"  # it had ended before the signal was sent
TERMINATED = "ended after the signal"  # it ended within the grace period
KILLED = "killed"  # still running after the grace period: SIGKILLed, then it ended
SURVIVED = "still running"  # not even SIGKILL ended it within the final wait (uninterruptible sleep, not ours to see)


@dataclass(frozen=True)
class Stopped:
    """How one target of :func:`stop_processes` ended: ``outcome`` is GONE, TERMINATED, KILLED or SURVIVED."""

    pid: int
    outcome: str
    group: bool = False
    returncode: int | None = None  # known for a subprocess.Popen target

    @property
    def ended(self) -> bool:
        """True unless the process (group) is still running."""
        return self.outcome != SURVIVED


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists and has not ended (a zombie waiting to be reaped counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    fields = _stat_fields(pid)
    if fields is None:
        return not Path("/proc").is_dir()  # no /proc: os.kill said it exists; /proc without the entry: it just ended
    return fields[0] not in ("Z", "X")


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def group_members(pgid: int) -> list[int]:
    """Running (not zombie) processes of process group ``pgid``."""
    members = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is not None and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(pid)
    return members


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (0 when unknown)."""
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields else 0
    except (IndexError, ValueError):
        return 0


def command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process whose command line can be read now (this process excluded)."""
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        try:
            yield pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue


def pids_matching(*needles: str) -> list[int]:
    """PIDs of processes whose command line (arguments joined by spaces) contains every needle."""
    found = []
    for pid, argv in command_lines():
        text = b" ".join(argv).decode(errors="replace")
        if all(n in text for n in needles):
            found.append(pid)
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents before their children."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        children.setdefault(parent_pid(child), []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _send(target: int | subprocess.Popen, signum: int, group: bool) -> bool:
    """Signal a target; False when it was already gone."""
    pid = target.pid if isinstance(target, subprocess.Popen) else target
    try:
        if group:
            os.killpg(pid, signum)
        elif isinstance(target, subprocess.Popen):
            if target.poll() is not None:
                return False
            target.send_signal(signum)
        elif process_alive(pid):  # a zombie has ended already
            os.kill(pid, signum)
        else:
            return False
    except ProcessLookupError:
        return False
    return True


def _running(target: int | subprocess.Popen, group: bool) -> bool:
    if isinstance(target, subprocess.Popen):
        leader = target.poll() is None  # reaps our own child
        return leader or (group and bool(group_members(target.pid)))
    return bool(group_members(target)) if group else process_alive(target)


def stop_processes(
    targets: Sequence[int | subprocess.Popen],
    *,
    grace_s: float = 15.0,
    group: bool = False,
    signum: int = signal.SIGTERM,
    kill_wait_s: float = 30.0,
    poll_s: float = 0.05,
) -> list[Stopped]:
    """Stop processes: ``signum`` (SIGTERM) to each target in the given order, wait at most ``grace_s`` for all of
    them together, SIGKILL what is left, then wait at most ``kill_wait_s`` for those; returns what happened to each.

    A target is a PID or a :class:`subprocess.Popen` (then it is reaped and its return code reported). With
    ``group`` a target names a process group (its leader's PID, e.g. a child started with ``start_new_session``):
    the whole group is signalled, and it has ended when no member is left (grandchildren included).
    """
    sent = [_send(t, signum, group) for t in targets]
    deadline = time.monotonic() + grace_s
    while any(_running(t, group) for t in targets) and time.monotonic() < deadline:
        time.sleep(poll_s)
    killed = []
    for target in targets:
        if _running(target, group):
            _send(target, signal.SIGKILL, group)
            killed.append(target)
    deadline = time.monotonic() + kill_wait_s
    while any(_running(t, group) for t in killed) and time.monotonic() < deadline:
        time.sleep(poll_s)
    results = []
    for target, was_sent in zip(targets, sent, strict=True):
        pid = target.pid if isinstance(target, subprocess.Popen) else target
        if target in killed:
            outcome = SURVIVED if _running(target, group) else KILLED
        else:
            outcome = TERMINATED if was_sent else GONE
        code = target.poll() if isinstance(target, subprocess.Popen) else None
        results.append(Stopped(pid=pid, outcome=outcome, group=group, returncode=code))
    return results


def stop_process(
    target: int | subprocess.Popen, *, grace_s: float = 15.0, group: bool = False, signum: int = signal.SIGTERM
) -> Stopped:
    """:func:`stop_processes` for one target."""
    return stop_processes([target], grace_s=grace_s, group=group, signum=signum)[0]


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int, *, signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``signum`` to this process the moment its parent ``parent`` ends (Linux
    ``prctl(PR_SET_PDEATHSIG)``); call it first thing in a forked child. Returns False when the parent has already
    ended (the child was re-parented before the request took effect: the caller should exit) or the platform has no
    such request.

    A parent that dies by SIGKILL cannot stop its children itself, and polling for it misses a parent that is an
    unreaped zombie (it still "exists"); the kernel's signal does neither. Inherited by no one: ``fork`` clears it.
    """
    if signum <= 0 or signum >= signal.NSIG:
        raise ValueError(f"signum must be a signal number in 1..{signal.NSIG - 1}, got {signum}")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    return os.getppid() == parent


def kill_later(proc: subprocess.Popen, after_s: float) -> threading.Timer:
    """SIGKILL ``proc`` if it is still running ``after_s`` seconds from now (a daemon timer; the caller has already
    asked it to stop and must not block, e.g. inside a signal handler's thread)."""
    timer = threading.Timer(after_s, lambda: proc.poll() is None and proc.kill())
    timer.daemon = True
    timer.start()
    return timer
