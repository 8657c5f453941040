"""fedct.processes: stopping real child processes (one that exits on SIGTERM, one that ignores it, a process group
with a grandchild) and the /proc look-ups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from fedct.processes import (
    GONE,
    KILLED,
    TERMINATED,
    end_with_parent,
    kill_later,
    pids_matching,
    process_alive,
    process_tree,
    stop_process,
    stop_processes,
)

#: A child that prints "ready" once its SIGTERM handling is set up, then sleeps.
OBEYS = "import signal, sys, time; print('ready', flush=True); time.sleep(300)"
IGNORES = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"
)
#: A process-group leader that starts a grandchild (which ignores SIGTERM when told to) and reports its PID.
LEADER = """
import subprocess, sys, time
ignore = sys.argv[1] == "ignore"
code = ("import signal, time; " + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore else "")
        + "print('ready', flush=True); time.sleep(300)")
child = subprocess.Popen([sys.executable, "-c", code, sys.argv[2]], stdout=subprocess.PIPE)
child.stdout.readline()  # its SIGTERM handling is set up
print(child.pid, flush=True)
time.sleep(300)
"""

#: A parent that forks a child (which asks to end with it when told to) and reports the child's PID and what the
#: request returned; both then sleep.
FORKS = """
import os, sys, time
from fedct.processes import end_with_parent
parent = os.getpid()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    ok = end_with_parent(parent) if sys.argv[1] == "ask" else None
    os.write(write, repr(ok).encode())
    time.sleep(300)
    os._exit(0)
print(pid, os.read(read, 64).decode(), flush=True)
time.sleep(300)
"""


def _start(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def started():
    """Every process a test starts, killed at the end whatever happened."""
    procs: list[subprocess.Popen] = []
    pids: list[int] = []
    yield procs, pids
    for pid in pids:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_child_that_obeys_sigterm_ends_after_the_signal(started):
    proc = _start(OBEYS)
    started[0].append(proc)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    result = stop_process(proc, grace_s=30)
    assert result.outcome == TERMINATED and result.returncode == -signal.SIGTERM and result.pid == proc.pid
    assert result.ended and time.monotonic() - t0 < 30  # it did not wait out the grace period
    assert not process_alive(proc.pid)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(started):
    proc = _start(IGNORES)
    started[0].append(proc)
    assert proc.stdout.readline().strip() == "ready"
    result = stop_process(proc, grace_s=0.5)
    assert result.outcome == KILLED and result.returncode == -signal.SIGKILL


def test_plain_pids_mixed_outcomes_in_one_call(started):
    """PIDs (not Popen objects): each target gets its own outcome; a zombie counts as ended; a gone PID is GONE."""
    obeys, ignores, done = _start(OBEYS), _start(IGNORES), _start("pass")
    started[0].extend([obeys, ignores, done])
    for proc in (obeys, ignores):
        assert proc.stdout.readline().strip() == "ready"
    done.wait(timeout=30)
    results = stop_processes([obeys.pid, ignores.pid, done.pid], grace_s=1.0)
    assert [r.outcome for r in results] == [TERMINATED, KILLED, GONE]
    assert all(r.returncode is None for r in results)  # not ours to reap through a PID
    assert obeys.wait(timeout=30) == -signal.SIGTERM and ignores.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.parametrize("grandchild", ["obey", "ignore"])
def test_a_process_group_is_stopped_with_its_grandchild(started, grandchild):
    marker = f"fedct-test-{uuid.uuid4().hex}"
    leader = _start(LEADER, grandchild, marker, start_new_session=True)
    started[0].append(leader)
    child = int(leader.stdout.readline())
    started[1].append(child)
    assert (
        process_alive(child)
        and child in process_tree(leader.pid)
        and sorted(pids_matching(marker)) == sorted([leader.pid, child])
    )
    result = stop_process(leader, grace_s=1.0, group=True)
    assert result.group and result.outcome == (TERMINATED if grandchild == "obey" else KILLED)
    assert not process_alive(child) and not pids_matching(marker)


def test_without_group_the_grandchild_is_left_running(started):
    """The difference ``group=True`` makes: stopping only the leader orphans its child."""
    leader = _start(LEADER, "obey", "x", start_new_session=True)
    started[0].append(leader)
    child = int(leader.stdout.readline())
    started[1].append(child)
    assert stop_process(leader, grace_s=5).outcome == TERMINATED
    assert process_alive(child)
    assert stop_process(child, grace_s=5).outcome == TERMINATED
    assert not process_alive(child)


def test_a_zombie_counts_as_gone(started):
    proc = _start("pass")
    started[0].append(proc)
    while process_alive(proc.pid):  # ended but not reaped: a zombie
        time.sleep(0.05)
    assert stop_process(proc.pid).outcome == GONE
    assert proc.wait(timeout=30) == 0  # still ours to reap, exit status intact


def test_gone_targets_and_nothing_to_stop(started):
    proc = _start("pass")
    started[0].append(proc)
    proc.wait(timeout=30)
    assert stop_process(proc).outcome == GONE and stop_process(proc).returncode == 0
    assert stop_process(proc.pid, group=True).outcome == GONE  # no such process group any more
    assert stop_processes([]) == []
    assert not process_alive(proc.pid)


def test_kill_later_kills_only_what_is_still_running(started):
    stubborn, quick = _start(IGNORES), _start(OBEYS)
    started[0].extend([stubborn, quick])
    for proc in (stubborn, quick):
        assert proc.stdout.readline().strip() == "ready"
        proc.terminate()
        kill_later(proc, 0.5)
    assert quick.wait(timeout=30) == -signal.SIGTERM
    assert stubborn.wait(timeout=30) == -signal.SIGKILL


def test_process_tree_and_pids_matching_see_this_process_children(started):
    marker = f"fedct-test-{uuid.uuid4().hex}"
    proc = _start(OBEYS, marker)
    started[0].append(proc)
    assert proc.stdout.readline().strip() == "ready"
    assert process_tree(os.getpid())[0] == os.getpid() and proc.pid in process_tree(os.getpid())
    assert pids_matching(marker) == [proc.pid] and pids_matching(marker, "no-such-needle") == []


@pytest.mark.parametrize("ask", [True, False])
def test_a_forked_child_ends_with_its_killed_parent_only_when_it_asked(started, ask):
    proc = _start(FORKS, "ask" if ask else "no", cwd=os.getcwd())
    started[0].append(proc)
    child, answer = proc.stdout.readline().split()
    started[1].append(int(child))
    assert answer == ("True" if ask else "None")
    proc.kill()  # SIGKILL: the parent can stop nothing itself
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while process_alive(int(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_alive(int(child)) is not ask  # without the request the orphan would run on


def test_asking_after_the_parent_has_ended_says_so(started):
    code = """
import os, time
from fedct.processes import end_with_parent
parent = os.getpid()
if os.fork() != 0:
    os._exit(0)  # the parent ends at once
while os.getppid() == parent:
    time.sleep(0.01)
print(end_with_parent(parent), flush=True)
"""
    proc = _start(code, cwd=os.getcwd())
    started[0].append(proc)
    assert proc.stdout.readline().strip() == "False"


@pytest.mark.parametrize("signum", [0, -1, signal.NSIG])
def test_end_with_parent_names_a_bad_signal(signum):
    with pytest.raises(ValueError, match=f"got {signum}"):
        end_with_parent(os.getppid(), signum=signum)
