"""fl_client.executor: the warm site executor.

Integration: a real insecure SuperLink and two SuperNodes started with ``--isolation process`` on 127.0.0.1,
one warm executor per SuperNode, and a 2-round fedct run submitted with ``flwr run`` (isolated FLWR_HOME,
tiny synthetic sites). The copied app's ClientApp module drops a marker file named after its process id
when it is imported: the markers prove that the ClientApp code came from the run's FAB and ran in the
executor's forked children (not in the executor, not in a fresh ``flwr-clientapp``). Every PID is stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from federation import TINY_RUN_CONFIG, pids_matching, stop_pids, tiny_federation

from bench.deployment import BIN, LocalDeployment, SiteSpec, free_port, wait_for_port
from fl_client.executor import (
    ExecutorConfig,
    ExecutorConfigError,
    discover_third_party_modules,
    parse_args,
    preload_modules,
)

ROOT = Path(__file__).resolve().parents[1]
MARKER = """
import os as _os, pathlib as _pathlib
if _os.environ.get("FEDCT_TEST_MARKER_DIR"):
    _pathlib.Path(_os.environ["FEDCT_TEST_MARKER_DIR"], f"{_os.getpid()}-{_os.getppid()}").touch()
"""


def _value(v):
    return f'"{v}"' if isinstance(v, str) else str(v)


def test_fedct_run_through_warm_executors_trains_with_the_fab_code_in_forked_children(tmp_path):
    data = tiny_federation(tmp_path / "data", sites=2, patients_per_site=6)
    app = tmp_path / "app"
    shutil.copytree(
        ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", ".pytest_cache", "*.egg-info")
    )
    with open(app / "fl_client" / "client_app.py", "a") as f:
        f.write(MARKER)
    markers = tmp_path / "markers"
    markers.mkdir()
    sites = sorted(p.name for p in data.iterdir() if p.is_dir())
    specs = [
        SiteSpec(
            node_config=f'site-name="{s}" dicom-dir="{data / s / "dicom"}" labels="{data / s / "labels.csv"}" '
            f'site-dir="{tmp_path / "sites" / s}" device="cpu"',
            isolation="process",
        )
        for s in sites
    ]
    run_dir = tmp_path / "run"
    overrides = {**TINY_RUN_CONFIG, "num-server-rounds": 2, "run-dir": str(run_dir)}
    deployment = LocalDeployment(tmp_path / "deployment", specs, env={"FEDCT_TEST_MARKER_DIR": str(markers)})
    with deployment:
        ports = [deployment.port, *deployment.runtime_ports]
        executor_pids = [p.pid for p in deployment.procs if "fl_client.executor" in " ".join(map(str, p.args))]
        assert len(executor_pids) == 2
        assert not pids_matching("flower-superexec", f"127.0.0.1:{deployment.runtime_ports[0]}"), (
            "process isolation starts no SuperExec"
        )
        done = deployment.flwr_run(app, " ".join(f"{k}={_value(v)}" for k, v in overrides.items()), timeout_s=900)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert "run finished" in output, output[-3000:]
        assert all(p.poll() is None for p in deployment.procs), "a SuperNode or executor died during the run"
    for port in ports:
        assert not pids_matching(f"127.0.0.1:{port}"), f"a process on port {port} is still running"
    assert all(
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        for pid in executor_pids
    )

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert sorted(metrics["rounds"][-1]["train"]["sites"]) == sites
    assert (run_dir / "model" / "final" / "model.pt").is_file()

    # 2 rounds x (train + evaluate) x 2 sites = 8 ClientApp tasks, plus the out-of-distribution reference after the
    # last round (moments and distances per distinct model round, each at both sites), each in a child of an executor,
    # all exit 0.
    reference_rounds = {entry["round"] for entry in metrics["ood"].values()}
    assert reference_rounds and reference_rounds <= {1, 2}, metrics["ood"]
    logs = "".join((tmp_path / "deployment" / "logs" / f"executor{i}.log").read_text() for i in range(2))
    ended = re.findall(r"ClientApp child (\d+) exited with code (-?\d+)", logs)
    assert len(ended) == 8 + 2 * 2 * len(reference_rounds), logs[-3000:]
    assert {code for _, code in ended} == {"0"}, logs[-3000:]
    # The FAB's client_app module was imported in those children, whose parents are the executors.
    imported_in = {tuple(map(int, m.name.split("-"))) for m in markers.iterdir()}
    assert {pid for pid, _ in imported_in} == {int(pid) for pid, _ in ended}
    assert {ppid for _, ppid in imported_in} <= set(executor_pids)


def test_preload_imports_installed_modules_and_skips_the_unimportable():
    result = preload_modules(["json", "numpy", "no_such_module_fedct_xyz"])
    assert (result.imported, result.skipped) == (2, 1)
    assert result.threads >= 1 and result.seconds >= 0


def test_discovery_lists_third_party_modules_of_the_client_app_but_none_of_fedct():
    names = discover_third_party_modules("fl_client.client_app")
    tops = {n.split(".")[0] for n in names}
    assert {"torch", "monai", "flwr", "numpy"} <= tops
    assert not tops & {"fl_client", "fl_server", "models", "preprocessing", "fedct", "synthetic", "inference"}


def test_discovery_of_a_missing_app_module_names_the_option():
    with pytest.raises(ExecutorConfigError, match="--preload-app 'no_such_app_xyz'"):
        discover_third_party_modules("no_such_app_xyz")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runtime_api_address": "localhost"}, "--runtime-api-address"),
        ({"runtime_api_address": "127.0.0.1:x"}, "--runtime-api-address"),
        ({"insecure": False}, "--root-certificates"),
        ({"insecure": True, "root_certificates": Path("/etc/hostname")}, "exclude each other"),
        ({"insecure": False, "root_certificates": Path("/no/such/ca.crt")}, "--root-certificates /no/such/ca.crt"),
        ({"superexec_auth_secret_file": Path("/no/such/secret")}, "--superexec-auth-secret-file"),
        ({"poll_interval_s": 0.0}, "--poll-interval"),
        ({"poll_interval_s": 120.0}, "--poll-interval"),
        ({"max_concurrent": 0}, "--max-concurrent"),
        ({"parent_pid": 0}, "--parent-pid"),
    ],
)
def test_bad_settings_are_refused_with_the_option_named(kwargs, message):
    base = {"runtime_api_address": "127.0.0.1:9094", "insecure": True}
    with pytest.raises(ExecutorConfigError, match=re.escape(message)):
        ExecutorConfig(**{**base, **kwargs})


def test_command_line_good_and_bad(capsys):
    config = parse_args(
        [
            "--runtime-api-address",
            "127.0.0.1:9094",
            "--insecure",
            "--poll-interval",
            "0.05",
            "--preload-app",
            "",
            "--approved-apps",
            "disabled-i-understand",
        ]
    )
    assert config == ExecutorConfig(
        runtime_api_address="127.0.0.1:9094", insecure=True, poll_interval_s=0.05, preload_app=None
    )
    with pytest.raises(SystemExit) as stop:
        parse_args(["--runtime-api-address", "127.0.0.1:9094"])
    assert stop.value.code == 2
    assert "--root-certificates" in capsys.readouterr().err


def test_executor_enforces_the_site_allow_list_by_default(tmp_path, monkeypatch):
    """The warm executor checks apps like the flwr-clientapp launcher: off only when said, closed when unset."""
    from fl_client.approval import ALLOW_LIST_ENV
    from fl_client.executor import parse_args

    base = ["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--preload-app", ""]
    monkeypatch.delenv(ALLOW_LIST_ENV, raising=False)
    assert parse_args(base + ["--approved-apps", "disabled-i-understand"]).approved_apps is None
    listed = tmp_path / "approved-apps.txt"
    assert parse_args(base + ["--approved-apps", str(listed)]).approved_apps == listed
    refuse_all = parse_args(base).approved_apps
    assert refuse_all is not None and not refuse_all.exists()  # no list configured: nothing is approved


@pytest.mark.parametrize("value", ["off", "none", ""])
def test_executor_cannot_be_told_to_skip_approval_by_accident(monkeypatch, capsys, value):
    from fl_client.approval import ALLOW_LIST_ENV

    base = ["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--preload-app", ""]
    if value:
        with pytest.raises(SystemExit) as stop:
            parse_args(base + ["--approved-apps", value])
        assert stop.value.code == 2
        assert f"--approved-apps={value!r} does not switch app approval off" in capsys.readouterr().err
        monkeypatch.setenv(ALLOW_LIST_ENV, value)
        with pytest.raises(SystemExit):
            parse_args(base)
        assert f"FEDCT_APPROVED_APPS={value!r} does not switch" in capsys.readouterr().err
    else:  # an empty setting: nothing configured, every app refused (fail closed)
        refused = parse_args(base + ["--approved-apps", value]).approved_apps
        assert refused is not None and not refused.exists()


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


@pytest.fixture
def supernode(tmp_path):
    """A real SuperNode (process isolation, SuperExec secret) whose Runtime API serves while it looks for a SuperLink."""
    secret = tmp_path / "superexec.secret"
    secret.write_text(os.urandom(32).hex())
    port = free_port()
    log = (tmp_path / "supernode.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{free_port()}",
            "--isolation",
            "process",
            "--port",
            str(port),
            "--superexec-auth-secret-file",
            str(secret),
        ],
        env=_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port, secret
    finally:
        stop_pids([proc.pid, *pids_matching(f"127.0.0.1:{port}")])
        proc.wait(timeout=30)
        log.close()


def _executor(tmp_path: Path, port: int, *args: str) -> subprocess.Popen:
    out = (tmp_path / f"executor-{port}.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fl_client.executor",
            "--runtime-api-address",
            f"127.0.0.1:{port}",
            "--insecure",
            "--approved-apps",
            "disabled-i-understand",
            "--preload-app",
            "",
            *args,
        ],
        env=_env(tmp_path),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _exits(proc: subprocess.Popen, *, within: float = 120.0) -> int:
    """The exit code; fails (after killing it) if it is still running after ``within`` seconds (a liveness bound)."""
    try:
        return proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"process {proc.pid} did not exit within {within:.0f}s")


@pytest.mark.parametrize(
    "supernode_up", [True, False], ids=["polling-a-supernode", "retrying-a-supernode-that-is-gone"]
)
def test_parent_pid_ends_the_executor_when_the_parent_is_gone(tmp_path, request, supernode_up):
    """fedct site passes its PID: the executor must end by itself even when the site is SIGKILLed, also while a
    Runtime API call keeps retrying against a SuperNode that went with it."""
    if supernode_up:
        port, secret = request.getfixturevalue("supernode")
        extra = ["--superexec-auth-secret-file", str(secret)]
    else:
        port, extra = free_port(), []  # nothing listens: AcquireTask retries without end
    parent = subprocess.Popen(["sleep", "600"])  # a real process standing in for `fedct site`
    executor = _executor(tmp_path, port, "--parent-pid", str(parent.pid), *extra)
    try:
        log = tmp_path / f"executor-{port}.log"
        deadline = time.monotonic() + 120
        while "serving 127.0.0.1" not in log.read_text() and executor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert executor.poll() is None, log.read_text()  # runs while its parent lives
        assert "WARNING app approval is DISABLED at this site (FEDCT_APPROVAL=disabled-i-understand)" in log.read_text()
        parent.kill()
        parent.wait()
        assert _exits(executor) == 0, log.read_text()
        assert f"parent process {parent.pid} is gone; stopping" in log.read_text()
        assert not [pid for pid in pids_matching("fl_client.executor", f"127.0.0.1:{port}")], (
            "an executor or child survived"
        )
    finally:
        stop_pids([p.pid for p in (executor, parent) if p.poll() is None])


def test_an_executor_without_the_supernodes_secret_says_so_and_exits(tmp_path, supernode):
    port, _ = supernode
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not the supernode's secret")
    for args in (["--superexec-auth-secret-file", str(wrong)], []):
        executor = _executor(tmp_path, port, *args)
        assert _exits(executor) == 3
        text = (tmp_path / f"executor-{port}.log").read_text()
        assert "refused task acquisition (HTTP 401, SuperExec authentication failed)" in text, text[-2000:]


# --- the approved code is the code that runs, in every install layout (#16.7) ------------------------------------------

PROJECT = {"fedct", "fl_client", "fl_server", "preprocessing", "models", "synthetic", "inference", "bench"}
SOURCE_PARTS = ("pyproject.toml", "README.md", *sorted(PROJECT))


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> Path:
    """A NON-editable install of this checkout (``pip install --no-deps --target``), as a site may have it: the
    project's packages then live in a ``site-packages`` folder like any third-party library."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    for part in SOURCE_PARTS:
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, source / part)
    target = root / "site-packages"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (target / "fl_client" / "executor.py").is_file() and not (target / "fl_client" / "__editable__").exists()
    return target


def _run_installed(target: Path, cwd: Path, code: str, **env: str) -> dict:
    """Run ``code`` with only the installed copy importable (no checkout on the path), from another folder."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(PYTHONPATH=str(target), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", **env)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd, env=environ
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_non_editable_install_preloads_third_party_modules_only(installed_copy, tmp_path):
    """Before the fix, discovery listed every module under 'site-packages', the installed fl_client/models/
    preprocessing included, and the executor preloaded them."""
    out = _run_installed(
        installed_copy,
        tmp_path,
        """
import json, sys
import fl_client
from fl_client.executor import _DISCOVER, discover_third_party_modules, project_packages
import subprocess
everything = subprocess.run([sys.executable, "-c", _DISCOVER, "fl_client.client_app", "[]"], capture_output=True,
                            text=True, check=True).stdout.strip().splitlines()[-1]
print(json.dumps({"file": fl_client.__file__, "own": sorted(project_packages()),
                  "found": discover_third_party_modules("fl_client.client_app"), "unfiltered": json.loads(everything)}))
""",
    )
    assert out["file"].startswith(str(installed_copy))  # the installed copy, not this checkout
    assert set(out["own"]) == PROJECT  # from the installed distribution's metadata: no pyproject.toml there
    tops = {n.split(".")[0] for n in out["found"]}
    assert {"torch", "monai", "flwr", "numpy"} <= tops
    assert not tops & PROJECT, sorted(tops & PROJECT)
    assert {"fl_client", "models", "preprocessing"} <= {
        n.split(".")[0] for n in out["unfiltered"]
    }  # what the old filter kept


def test_the_warm_child_runs_the_fabs_code_not_the_installed_copy(installed_copy, tmp_path):
    """The executor's parent preloads as in production (installed copy, another working folder); then the steps of a
    forked child (allow-list gate, forget the project's modules, Flower's FAB install and ClientApp loader) load the
    ClientApp from an approved FAB whose client_app module carries a marker the installed copy does not have."""
    app = tmp_path / "app"
    app.mkdir()
    for part in SOURCE_PARTS:
        if part != "bench":  # the FAB holds what pyproject's fab-include names
            (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, app / part)
    with open(app / "fl_client" / "client_app.py", "a") as f:
        f.write('\nFEDCT_TEST_COPY = "the approved FAB"\n')
    from fl_client.approval import approve

    allow = tmp_path / "approval" / "approved-apps.txt"
    approve(app, allow)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = _run_installed(
        installed_copy,
        work,
        f"""
import json, os, sys
from fl_client.approval import fab_bytes_of, gate_fab_install
from fl_client.executor import FLOWER_MODULES, _forget_own_modules, discover_third_party_modules, preload_modules
names = [*FLOWER_MODULES, *discover_third_party_modules("fl_client.client_app")]
result = preload_modules(names)
preloaded_own = sorted(n for n in sys.modules if n.split(".")[0] in ("models", "preprocessing", "fl_server", "inference"))
fab = fab_bytes_of({str(app)!r})
# --- what the forked child does (fl_client.executor._run_child) before Flower's run_clientapp
gate_fab_install({str(allow)!r})
_forget_own_modules()
import flwr.supernode.runtime.run_clientapp as runtime
from flwr.supercore.object_ref import load_app
app_dir = runtime.install_from_fab(fab, skip_prompt=True)
load_app("fl_client.client_app:app", RuntimeError, app_dir)
module = sys.modules["fl_client.client_app"]
print(json.dumps({{"preloaded": result.imported, "preloaded_own": preloaded_own, "torch": "torch" in sys.modules,
                  "file": module.__file__, "marker": getattr(module, "FEDCT_TEST_COPY", None), "app_dir": str(app_dir),
                  "models": sys.modules["models.factory"].__file__}}))
""",
        FLWR_HOME=str(tmp_path / "flwr-home"),
    )
    assert out["preloaded"] > 500 and out["torch"]  # warm: the third-party libraries were preloaded
    assert out["preloaded_own"] == []  # ... and none of the project's packages
    assert out["marker"] == "the approved FAB"
    assert out["file"].startswith(out["app_dir"]) and out["models"].startswith(out["app_dir"])
    assert not out["file"].startswith(str(installed_copy))
