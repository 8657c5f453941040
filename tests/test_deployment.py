"""Real deployment on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, two site SuperNodes, each
started by the same entrypoint scripts the containers run (docker/entrypoint-*.sh), the app approved at both
sites. Every process is started here and stopped here by PID (and its children, found in /proc).

Sites run their ClientApps in fedct's warm executor (FEDCT_CLIENTAPP_RUNNER's default); the skipped-round test
brings site-1 back with FEDCT_CLIENTAPP_RUNNER=flower, so Flower's SuperExec path stays covered.

One consortium serves the whole module (starting it costs tens of seconds); each test submits its own run into
its own run folder. Waits below are liveness bounds (a broken deployment must fail, not hang), not speed checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from federation import TINY_RUN_CONFIG, pids_matching, process_tree, stop_pids, tiny_federation, wait_until

from fedct.certs import write_consortium
from fedct.deploy import ServerEnv, Submitted, executor_pids, run_status, submit_run
from fedct.processes import process_alive
from fl_client.approval import app_hash, approve
from fl_client.site_env import SiteEnv

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-0", "site-1")
#: The app sent to the sites: the project's packages and pyproject (no tests, data or venv).
APP_PARTS = (
    "pyproject.toml",
    "README.md",
    "fedct",
    "fl_client",
    "fl_server",
    "preprocessing",
    "models",
    "synthetic",
    "inference",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_env(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


class Consortium:
    """Paths, env files and the processes of the test consortium."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()  # the hospital-facing proxy (Fleet API only): what the sites are given
        self.superlink_port = _free_port()  # the SuperLink itself, 127.0.0.1 only (registration, runs)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.all_pids: set[int] = set()
        tiny_federation(root / "data", sites=len(SITES), patients_per_site=6)
        self.pki = write_consortium(root / "pki", sites=[*SITES, "site-x"], with_site_keys=True)
        keys = root / "server-keys"  # what the sites sent to the server: their public keys, not site-x's
        keys.mkdir()
        for name in SITES:
            shutil.copy(self.pki.site_public_keys[name], keys / f"{name}.pub")
        self.app = root / "app"
        self.app.mkdir()
        for part in APP_PARTS:
            src = ROOT / part
            if src.is_dir():
                shutil.copytree(src, self.app / part, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, self.app / part)
        self.server_env = _write_env(
            root / "server.env",
            {
                "FEDCT_SERVER_HOST": "127.0.0.1",
                "FEDCT_SERVER_PORT": self.port,
                "FEDCT_SUPERLINK_PORT": self.superlink_port,
                "FEDCT_CA_CERT": self.pki.ca_cert,
                "FEDCT_SERVER_CERT": self.pki.server_cert,
                "FEDCT_SERVER_KEY": self.pki.server_key,
                "FEDCT_STATE_DIR": root / "server-state",
                "FEDCT_SITE_KEYS": keys,
                "FEDCT_RUNS_DIR": root / "runs",
                "FEDCT_APP_DIR": self.app,
            },
        )
        self.site_envs = {name: self.site_env(name) for name in (*SITES, "site-x")}
        for name in SITES:
            approve(self.app, root / "approval" / name / "approved-apps.txt")  # outside the site's work folder

    def site_env(self, name: str, **changes: object) -> Path:
        data = "site-0" if name == "site-x" else name
        values = {
            "FEDCT_SITE_NAME": name,
            "FEDCT_SUPERLINK": f"127.0.0.1:{self.port}",
            "FEDCT_CA_CERT": self.root / "pki" / "sites" / name / "ca.crt",
            "FEDCT_SITE_KEY": self.pki.site_keys[name],
            "FEDCT_DICOM_DIR": self.root / "data" / data / "dicom",
            "FEDCT_LABELS": self.root / "data" / data / "labels.csv",
            "FEDCT_SITE_DIR": self.root / "work" / name,
            "FEDCT_APPROVED_APPS": self.root / "approval" / name / "approved-apps.txt",
            "FEDCT_DEVICE": "cpu",
            "FEDCT_WORKERS": 1,
            "FEDCT_RUNTIME_PORT": _free_port(),
            "FEDCT_INGEST_SPACING": TINY_RUN_CONFIG["target-spacing-mm"],
            "FEDCT_INGEST_INPUT_SIZE": TINY_RUN_CONFIG["input-size"],
            **changes,
        }
        suffix = "-" + "-".join(changes) if changes else ""
        return _write_env(self.root / f"{name}{suffix}.env", values)

    @staticmethod
    def process_env(**extra: str) -> dict[str, str]:
        """This venv's tools first on PATH, this checkout's packages first on PYTHONPATH, Flower quiet."""
        return {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            **extra,
        }

    def start(self, key: str, script: str, env_file: Path, *args: str) -> subprocess.Popen:
        log = self.root / "logs" / f"{key}-{len([k for k in self.logs if k.startswith(key)])}.log"
        log.parent.mkdir(exist_ok=True)
        proc = subprocess.Popen(
            [str(ROOT / "docker" / script), *args],
            env=self.process_env(FEDCT_ENV=str(env_file)),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[key], self.logs[key] = proc, log
        self.all_pids.add(proc.pid)
        return proc

    def log_text(self, key: str) -> str:
        return self.logs[key].read_text(errors="replace") if key in self.logs else ""

    def start_server(self) -> None:
        self.start("server", "entrypoint-server.sh", self.server_env)
        wait_until(
            lambda: "fedct server: ready" in self.log_text("server") or self.procs["server"].poll() is not None,
            timeout=180,
            what="the SuperLink to start and register the sites",
        )
        assert self.procs["server"].poll() is None, self.log_text("server")[-3000:]

    def start_site(self, name: str, *, activations_before: int | None = None, env_file: Path | None = None) -> None:
        before = (
            self.log_text("server").count("Activated node_id") if activations_before is None else activations_before
        )
        if env_file is not None:
            self.site_envs[name] = env_file
        self.start(name, "entrypoint-site.sh", self.site_envs[name])
        wait_until(
            lambda: self.log_text("server").count("Activated node_id") > before or self.procs[name].poll() is not None,
            timeout=240,
            what=f"{name} to ingest and connect",
        )
        assert self.procs[name].poll() is None, self.log_text(name)[-3000:]

    def kill(self, key: str) -> None:
        """SIGKILL a process and its descendants (a site or server that dies without a word). The tree is frozen
        (SIGSTOP) until no new descendant appears, so a child forked between the look-up and the kill is killed too."""
        pids: list[int] = []
        while new := [p for p in process_tree(self.procs[key].pid) if p not in pids]:
            for pid in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            pids += new
        self.all_pids.update(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[key].wait(timeout=30)

    def stop_all(self) -> None:
        pids = set(self.all_pids)
        for pid in list(pids):
            pids.update(process_tree(pid))
        pids.update(pids_matching(str(self.root)))
        stop_pids(sorted(pids))
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def submit(self, run_name: str, *, app: Path | None = None, stream: bool = True, **settings: object) -> Submitted:
        config = {
            **TINY_RUN_CONFIG,
            "round-timeout-s": 120.0,
            "min-sites": 2,
            "num-server-rounds": 2,
            **settings,
            "run-dir": run_name,
        }
        toml = self.root / f"{run_name}.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        return submit_run(ServerEnv.from_file(self.server_env), toml, app_dir=app, stream=stream, timeout=900)

    def wait_finished(self, run_id: int, *, timeout: float) -> tuple[str, str]:
        env = ServerEnv.from_file(self.server_env)
        return wait_until(
            lambda: (s := run_status(env, run_id))[0].startswith("finished") and s,
            timeout=timeout,
            what=f"run {run_id} to finish",
            poll=5,
        )

    def metrics(self, run_name: str) -> dict:
        return json.loads((self.root / "runs" / run_name / "metrics.json").read_text())

    def train_messages(self, site: str) -> int:
        return self.log_text(site).count("Receiving: train message")

    def runtime_port(self, site: str) -> int:
        return SiteEnv.from_file(self.site_envs[site], check_cuda=False).runtime_port

    def executors(self, site: str) -> list[int]:
        """The warm executor(s) serving the site's SuperNode (not their forked ClientApp children)."""
        return executor_pids(self.runtime_port(site))


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> Consortium:
    old = {k: os.environ.get(k) for k in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")}
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    fed = Consortium(tmp_path_factory.mktemp("consortium"))
    try:
        fed.start_server()
        for name in SITES:
            fed.start_site(name)
        yield fed
    finally:
        fed.stop_all()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not pids_matching(str(fed.root)), "a process of the test consortium is still running"
    assert not any(pids_matching("fl_client.executor", f"127.0.0.1:{fed.runtime_port(n)}") for n in SITES)


def _server_log(fed: Consortium, run_id: int) -> str:
    """The ServerApp's log of a run (``flwr log``), as the coordinator would read it."""
    env = ServerEnv.from_file(fed.server_env)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "log", str(run_id), "consortium", "--show"],
        env=fed.process_env(FLWR_HOME=str(env.cli_home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def _round(metrics: dict, n: int) -> dict:
    return next(r for r in metrics["rounds"] if r["round"] == n)


def test_two_rounds_over_tls_with_node_authentication(consortium):
    fed = consortium
    server_log = fed.log_text("server")
    assert "--enable-supernode-auth" in server_log and "--ssl-certfile" in server_log and "--insecure" not in server_log
    # the sites reached the SuperLink through the proxy; the SuperLink itself listens on loopback only
    assert (
        f"--host 127.0.0.1 --port {fed.superlink_port}" in server_log
        and f"the proxy on 127.0.0.1:{fed.port}" in server_log
    )
    assert "site site-0: registered" in server_log and "site site-1: registered" in server_log
    before = {name: len(fed.log_text(name)) for name in SITES}  # this run's part of the sites' logs starts here
    done = fed.submit(
        "two-rounds", **{"evaluate-mode": "fused"}
    )  # as configs/run.toml deploys: evaluation inside the train exchange
    assert done.status == "finished:completed", done.output[-4000:]
    run_dir = fed.root / "runs" / "two-rounds"
    for n in range(3):
        assert torch.load(run_dir / "checkpoints" / f"round-{n:03d}.pt", weights_only=True), n
    metrics = fed.metrics("two-rounds")
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert not entry["skipped"]
        assert set(entry["train"]["sites"]) == set(SITES)
        assert set(entry["evaluate"]["sites"]) == set(SITES)
    assert (run_dir / "model" / "final" / "model.pt").is_file()
    assert (fed.root / "server-state" / "state.db").is_file()  # SuperLink state on disk
    # the last evaluation, then the out-of-distribution reference: moments and distances per distinct model round
    reference_rounds = {entry["round"] for entry in metrics["ood"].values()}
    assert reference_rounds and reference_rounds <= {1, 2}, metrics["ood"]
    evaluations = 1 + 2 * len(reference_rounds)
    for name in SITES:
        text = fed.log_text(name)
        assert f"app FAB sha256 {app_hash(fed.app)} is approved at this site" in text
        # The warm runner (default): no Flower SuperExec; each message ran in a child forked by the site's executor.
        assert "FEDCT_CLIENTAPP_RUNNER=warm" in text and "Start `flwr-clientapp` process" not in text
        # fused: train, train (+ evaluation of round 1's model), then the last evaluation: 3 messages, not 4; then the
        # out-of-distribution reference, two evaluate exchanges per distinct model (best, final); the last child may
        # still be exiting when the run is reported finished
        wait_until(
            lambda: (
                len(re.findall(r"\[executor\] .*ClientApp child \d+ exited", fed.log_text(name)[before[name] :]))
                >= 2 + evaluations
            ),
            timeout=60,
            what=f"{name}'s ClientApp children to exit",
            poll=0.5,
        )
        run_text = fed.log_text(name)[before[name] :]
        ended = re.findall(r"\[executor\] .*ClientApp child \d+ exited with code (-?\d+)", run_text)
        assert len(ended) == 2 + evaluations and set(ended) == {"0"}, run_text[-3000:]
        assert run_text.count("Receiving: train message") == 2, run_text[-3000:]
        assert run_text.count("Receiving: evaluate message") == evaluations, run_text[-3000:]
        assert len(fed.executors(name)) == 1
        health = subprocess.run(
            [str(Path(sys.executable).parent / "fedct"), "site", "--env", str(fed.site_envs[name]), "--health"],
            env=fed.process_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert health.returncode == 0 and "warm executor running" in health.stdout, health.stdout + health.stderr
    # Timing with TLS + node auth (printed for the record; never asserted).
    for entry in metrics["rounds"]:
        train = max(s.get("train-seconds", 0.0) for s in entry["train"]["sites"].values())
        print(
            f"\n[deployment] round {entry['round']}: {entry['seconds']:.1f}s, slowest local training {train:.1f}s, "
            f"overhead {entry['seconds'] - train:.1f}s"
        )


def test_an_unapproved_app_is_refused_before_it_is_unpacked(consortium):
    fed = consortium
    changed = fed.root / "app-changed"
    shutil.copytree(fed.app, changed)
    with (changed / "fl_client" / "client_app.py").open("a") as fh:
        fh.write("\n# not reviewed by the sites\n")
    digest = app_hash(changed)
    t0 = time.monotonic()
    done = fed.submit("unapproved", app=changed, **{"num-server-rounds": 1, "round-timeout-s": 90.0})
    print(f"\n[deployment] unapproved app: run ended after {time.monotonic() - t0:.1f}s ({done.status})")
    for name in SITES:
        assert f"fedct: REFUSED app fedct/fedct 0.1.0 (FAB sha256 {digest})" in fed.log_text(name)
        apps = fed.root / "work" / name / "flwr-home" / "apps"  # absent when no app was ever installed (-k runs)
        installed = [p.name for p in apps.iterdir()] if apps.is_dir() else []
        assert not any(p.endswith(digest[:8]) for p in installed), installed  # never unpacked at the site
    if done.status == "finished:completed":  # the round loop records the round as skipped
        entry = _round(fed.metrics("unapproved"), 1)
        assert entry["skipped"] and not entry["train"]["sites"]
    else:
        assert done.status == "finished:failed", done.output[-3000:]


def test_a_supernode_without_a_registered_key_is_refused(consortium):
    fed = consortium
    t0 = time.monotonic()
    proc = fed.start("site-x", "entrypoint-site.sh", fed.site_envs["site-x"], "--no-ingest", "--activation-wait-s", "0")
    code = proc.wait(timeout=300)
    print(f"\n[deployment] unregistered SuperNode refused after {time.monotonic() - t0:.1f}s (exit {code})")
    assert code == 3
    text = fed.log_text("site-x")
    assert "Failed to activate SuperNode" in text  # Flower's words
    assert (
        "refused to activate this site (code 2004) for 0 s. Check that the server registered this site's public key"
        in text
    )
    assert "ApiError:2004" in fed.log_text("server")


def test_a_site_without_the_consortium_ca_gets_a_clear_message(consortium):
    fed = consortium
    other = write_consortium(fed.root / "other-pki")
    wrong = fed.site_env("site-0", FEDCT_CA_CERT=other.ca_cert)
    proc = fed.start("site-wrong-ca", "entrypoint-site.sh", wrong)
    assert proc.wait(timeout=120) == 2
    text = fed.log_text("site-wrong-ca")
    assert (
        f"the SuperLink at 127.0.0.1:{fed.port} presented a certificate that FEDCT_CA_CERT={other.ca_cert} does not verify"
        in text
    )
    assert "consortium's ca.crt" in text and "starting" not in text  # refused before any SuperNode started
    missing = fed.site_env("site-0", FEDCT_CA_CERT="")
    proc = fed.start("site-no-ca", "entrypoint-site.sh", missing)
    assert proc.wait(timeout=120) == 2
    assert (
        "missing FEDCT_CA_CERT (the consortium CA certificate (PEM) that signed the SuperLink's certificate)"
        in fed.log_text("site-no-ca")
    )


def test_a_site_killed_mid_round_does_not_hang_the_run_and_is_used_again(consortium):
    fed = consortium
    before = fed.train_messages("site-1")
    settings = {"num-server-rounds": 2, "min-sites": 1, "round-timeout-s": 60.0}
    done = fed.submit("dropout", stream=False, **settings)
    assert done.run_id is not None, done.output[-3000:]
    # Round 2 reaches site-1: kill its SuperNode (and task processes) while it trains, then bring it back.
    wait_until(lambda: fed.train_messages("site-1") >= before + 2, timeout=600, what="site-1 to receive round 2")
    executors = fed.executors("site-1")
    assert executors, "site-1 runs no warm executor"
    fed.kill("site-1")
    # The whole site went down: no executor (nor a ClientApp child of one) of site-1 is left behind.
    port = fed.runtime_port("site-1")
    wait_until(
        lambda: not pids_matching("fl_client.executor", f"127.0.0.1:{port}") and not any(map(process_alive, executors)),
        timeout=60,
        what="site-1's warm executor to end with the site",
    )
    # The restarted site is refused (code 2004) until its killed instance's heartbeats expire, then activated:
    # start_site returns on the SuperLink's "Activated node_id" line, however long that took.
    fed.start_site("site-1")
    status, details = fed.wait_finished(done.run_id, timeout=900)
    assert status == "finished:completed", details
    metrics = fed.metrics("dropout")
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert set(_round(metrics, 1)["train"]["sites"]) == set(SITES)
    second = _round(metrics, 2)
    assert not second["skipped"] and set(second["train"]["sites"]) == {"site-0"}  # the survivor (>= min-sites=1)
    assert any(m["site"] == "site-1" for m in second["missing_replies"]), second["missing_replies"]
    # The restarted site is used again: the run resumed for a third round that needs both sites. Its round loop
    # waits (up to a generous round-timeout-s) until the SuperLink lists both nodes, so the outcome does not depend
    # on whether site-1's reactivation beat the survivor's rounds (it did not, at random, with rounds 3-4 of one run).
    resumed = fed.submit(
        "dropout", **{**settings, "num-server-rounds": 3, "min-sites": 2, "round-timeout-s": 300.0}, resume=True
    )
    assert resumed.status == "finished:completed", resumed.output[-4000:]
    assert "resuming after round 2 of 3" in resumed.output
    third = _round(fed.metrics("dropout"), 3)
    assert not third["skipped"] and set(third["train"]["sites"]) == set(SITES), third


def test_resume_after_the_server_is_killed(consortium):
    from fl_server.checkpoint import load_run_state

    fed = consortium
    run_dir = fed.root / "runs" / "resume"
    settings = {"num-server-rounds": 3, "min-sites": 2, "round-timeout-s": 120.0}
    done = fed.submit("resume", stream=False, **settings)
    assert done.run_id is not None, done.output[-3000:]
    wait_until(
        lambda: (s := load_run_state(run_dir / "state")) is not None and s.server_round >= 1,
        timeout=600,
        what="round 1 to complete",
        poll=1,
    )
    registry = json.loads((fed.root / "server-state" / "site-registry.json").read_text())
    assert sorted(registry.values()) == sorted(SITES)
    fed.kill("server")  # SuperLink, its SuperExec, the ServerApp and the proxy, all SIGKILLed
    saved = load_run_state(run_dir / "state").server_round
    kept = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.pt")}
    fed.start_server()  # same env file: same database, keys already registered
    assert "site site-0: already registered" in fed.log_text("server")
    # same node ids for the same keys (database on disk): the registry the ServerApp reads is unchanged
    assert json.loads((fed.root / "server-state" / "site-registry.json").read_text()) == registry
    # The SuperNodes kept running and reconnect by themselves (their node ids live in the database); the round
    # loop waits up to round-timeout-s for min-sites of them.
    resumed = fed.submit("resume", **settings, resume=True)
    assert resumed.status == "finished:completed", resumed.output[-4000:]
    assert f"resuming after round {saved} of 3" in resumed.output
    metrics = fed.metrics("resume")
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]  # nothing lost, nothing repeated
    for name, data in kept.items():
        if int(name[6:9]) <= saved:
            assert (run_dir / "checkpoints" / name).read_bytes() == data, name  # completed rounds not redone
    assert {p.name for p in (run_dir / "checkpoints").glob("*.pt")} == {f"round-{n:03d}.pt" for n in range(4)}


# Last in the module: site-1 stays on Flower's runner afterwards (a fresh flwr-clientapp per message), which would
# slow every later test's rounds (the resume test took 291 s after it instead of ~100 s).
def test_a_round_with_too_few_sites_is_skipped_and_logged(consortium):
    fed = consortium
    before = fed.train_messages("site-1")
    done = fed.submit("skip", stream=False, **{"num-server-rounds": 3, "min-sites": 2, "round-timeout-s": 60.0})
    assert done.run_id is not None, done.output[-3000:]
    wait_until(lambda: fed.train_messages("site-1") >= before + 1, timeout=600, what="site-1 to receive round 1")
    fed.kill("site-1")
    # site-1 comes back with Flower's own runner (SuperExec + a flwr-clientapp process per message, through the
    # approval launcher): the old path keeps being exercised.
    fed.start_site("site-1", env_file=fed.site_env("site-1", FEDCT_CLIENTAPP_RUNNER="flower"))
    wait_until(  # the killed site's executor children end with it (a new warm executor would stay)
        lambda: not pids_matching("fl_client.executor", str(fed.root / "work" / "site-1")),
        timeout=30,
        what="no warm executor of site-1 (the restarted site runs Flower's own runner)",
    )
    status, details = fed.wait_finished(done.run_id, timeout=900)
    assert status == "finished:completed", details
    metrics = fed.metrics("skip")
    first = _round(metrics, 1)
    assert first["skipped"] and "fewer than min-sites=2" in first["skip_reason"]
    assert "skipped: 1 valid update(s), fewer than min-sites=2" in _server_log(fed, done.run_id)
    later = [_round(metrics, n) for n in (2, 3)]
    assert any(not r["skipped"] and set(r["train"]["sites"]) == set(SITES) for r in later), later  # site-1 is back
    text = fed.log_text("site-1")  # the restarted site's log
    assert (
        "FEDCT_CLIENTAPP_RUNNER=flower" in text
        and "Start `flwr-clientapp` process" in text
        and "[executor]" not in text
    )
    assert f"app FAB sha256 {app_hash(fed.app)} is approved at this site" in text  # through the approval launcher
    run_dir = fed.root / "runs" / "skip"
    initial, after_skip = (torch.load(run_dir / "checkpoints" / f"round-{n:03d}.pt", weights_only=True) for n in (0, 1))
    assert all(torch.equal(initial[k], after_skip[k]) for k in initial)  # a skipped round keeps the global model
