"""The GPU machine's check of issue #18, as one script: environment, a CUDA smoke run of fedct's training path,
the one-step equivalence of the old (MetaTensor) and new (plain-tensor) step on the device, and
``fedct bench train-loop`` at the GPU profile and at the CPU default size. Results go to ``--out`` (``$OUT``):
``gpu_check.json`` (summary) plus the benchmarks' JSON files; work files stay in a temporary folder.

On the GPU machine, from the repo root (wheels for monai, pydicom, nibabel in .whl/; docs in the README
"Benchmarks")::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD || exit; PYTHONUNBUFFERED=1 timeout 540 python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/log.txt

``--quick`` runs every part at the benchmarks' tiny size (seconds on a CPU, no GPU needed): the proof that the
script works end to end before device time is spent. Never imports flwr (not installed on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _step(summary: dict[str, Any], name: str, fn: Any, *args: Any) -> Any:
    """Run one part; record its result or its error (the other parts still run)."""
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        result = fn(*args)
        summary[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "result": result}
    except Exception as exc:  # noqa: BLE001 - a failing part must not hide the others
        traceback.print_exc()
        summary[name] = {
            "ok": False,
            "seconds": round(time.perf_counter() - t0, 1),
            "error": f"{type(exc).__name__}: {exc}",
        }
        result = None
    print(f"   {name}: {'ok' if summary[name]['ok'] else 'FAILED'} in {summary[name]['seconds']} s", flush=True)
    return result


def environment() -> dict[str, Any]:
    """Python, torch/CUDA, GPU, CPU count and the libraries fedct's training path imports."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            bf16_supported=torch.cuda.is_bf16_supported(),
            gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    for name in ("monai", "pydicom", "nibabel", "numpy", "flwr"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - reported as missing
            info[name] = None
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,utilization.gpu", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    print(json.dumps(info, indent=1), flush=True)
    return info


def imports_without_flwr() -> dict[str, Any]:
    """The training path and the benchmark import no flwr module (checked in a fresh interpreter)."""
    code = (
        "import sys, bench.train_loop, bench.cli, fl_client.train, fl_client.config, inference.predict; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-2000:])
    loaded = out.stdout.strip().splitlines()[-1]
    if loaded != "[]":
        raise RuntimeError(f"flwr/ray imported by the training path: {loaded}")
    return {"flwr_modules_imported": loaded}


def compiles_on_this_python() -> dict[str, Any]:
    """Every module of fedct's packages byte-compiles on this interpreter (3.12 on the GPU machine; #18.6)."""
    import py_compile

    packages = ("fedct", "fl_server", "fl_client", "preprocessing", "models", "synthetic", "inference", "bench")
    files = [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]
    failed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(files):
            try:
                py_compile.compile(str(path), cfile=str(Path(tmp) / f"{i}.pyc"), doraise=True)
            except py_compile.PyCompileError as exc:
                failed[str(path.relative_to(ROOT))] = str(exc)[-300:]
    if failed:
        raise RuntimeError(f"{len(failed)} module(s) do not compile on Python {platform.python_version()}: {failed}")
    return {"python": platform.python_version(), "modules": len(files)}


def smoke(work: Path) -> dict[str, Any]:
    """train_round + evaluate_round of a tiny synthetic site on the default device (CUDA there), automatic settings."""
    import numpy as np
    import torch

    from fl_client.config import RoundSettings, SiteConfig
    from fl_client.train import evaluate_round, site_compute, train_round
    from models.factory import ModelConfig, build_model
    from preprocessing.labels import DIAGNOSES
    from preprocessing.split import SplitConfig
    from preprocessing.transforms import PipelineConfig
    from synthetic.dicom_writer import PatientIdentity, write_ct_series

    root = work / "smoke"
    rng = np.random.default_rng(0)
    rows = ["StudyInstanceUID,diagnosis,severe,time_days,age,sex"]
    for i in range(12):
        label = i % 3
        uid = f"1.2.826.0.1.3680043.10.998.{i}"
        hu = rng.normal(-700 + 300 * label, 50, size=(10, 24, 24)).astype(np.float32)
        write_ct_series(
            root / "dicom" / f"s{i}",
            hu,
            pixel_spacing_mm=(8.0, 8.0),
            slice_spacing_mm=8.0,
            study_instance_uid=uid,
            series_instance_uid=uid + ".1",
            patient=PatientIdentity(f"T^P{i}", f"P{i}", "19500101", "F", "070Y"),
        )
        rows.append(f"{uid},{DIAGNOSES[label]},{int(label == 0)},{5 + 3 * label + i % 3},{50 + i},{'MF'[i % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    site = SiteConfig(
        site_name="smoke", dicom_dir=root / "dicom", site_dir=root / "work", labels_csv=root / "labels.csv"
    )
    model = ModelConfig(name="densenet121")
    results = {"compute": site_compute(site).summary()}
    for r in (1, 2):
        settings = RoundSettings(
            server_round=r,
            local_epochs=2,
            learning_rate=0.001,
            batch_size=4,
            seed=0,
            model=model,
            pipeline=PipelineConfig(input_size=(32, 32, 32), target_spacing_mm=(8.0, 8.0, 8.0)),
            split=SplitConfig(),
        )
        state = build_model(model).state_dict() if r == 1 else state  # noqa: F821 - set in round 1
        state, result = train_round(site, settings, state)
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise RuntimeError(f"round {r}: non-finite weights after training")
        results[f"round_{r}"] = {"loss": result.loss, "steps": result.steps, "seconds": result.seconds}
    metrics = evaluate_round(site, settings, state)
    results["evaluate"] = {
        k: metrics[k] for k in ("val-n", "val-accuracy", "test-accuracy", "val-loss") if k in metrics
    }
    return results


def step_equivalence() -> dict[str, Any]:
    """One step on the device: the old MetaTensor path (main before #18) against the plain-tensor path, fp32 both;
    and the automatic precision (bf16 + channels_last on a GPU) against fp32."""
    import torch
    from monai.data import MetaTensor

    from fl_client.compute import ComputeOptions, resolve_compute
    from fl_client.train import autocast, forward, loss_terms, prepare_model, select_device
    from models.factory import ModelConfig, build_model

    device = select_device("auto")
    torch.manual_seed(0)
    reference = build_model(ModelConfig(name="densenet121")).train()
    g = torch.Generator().manual_seed(0)
    images = torch.rand((4, 1, 64, 64, 48), generator=g)
    batch = {
        "image": images,
        "label": torch.tensor([0, 1, 2, -1]),
        "time": torch.tensor([3.0, 8.0, float("nan"), 5.0], dtype=torch.float64),
        "event": torch.tensor([1.0, 0.0, float("nan"), 1.0], dtype=torch.float64),
        "age": torch.full((4,), 60.0),
        "sex": torch.ones(4),
    }
    torch.backends.cudnn.deterministic = True

    def grads(
        model: Any, step_batch: dict[str, Any], compute: Any, *, old: bool
    ) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with autocast(compute, device):
            if old:  # main before #18: the MetaTensor itself goes through the network (metadata tracked on every op)
                features = model.dropout(model.backbone(step_batch["image"].to(device)))
                from models.factory import ModelOutput

                output = ModelOutput(model.diagnosis(features), model.prognosis(features).squeeze(1))
            else:
                output = forward(model, step_batch, device, channels_last=compute.channels_last)
        loss, _, _ = loss_terms(output, step_batch, weights=(1.0, 0.5), device=device)
        loss.backward()
        return float(loss.detach()), {
            n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    fp32 = resolve_compute(ComputeOptions(precision="fp32", channels_last=False), device)
    auto = resolve_compute(ComputeOptions(), device)
    meta_batch = {**batch, "image": MetaTensor(images, affine=torch.eye(4))}
    old_model = prepare_model(_copy(reference), fp32)
    new_model = prepare_model(_copy(reference), fp32)
    old_loss, old_grads = grads(old_model, meta_batch, fp32, old=True)
    new_loss, new_grads = grads(new_model, meta_batch, fp32, old=False)
    auto_loss, auto_grads = grads(prepare_model(_copy(reference), auto), batch, auto, old=False)

    def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        den = sum(float(b[k].norm() ** 2) for k in b) ** 0.5
        return num / den if den else 0.0

    out = {
        "device": str(device),
        "old_loss": old_loss,
        "new_loss": new_loss,
        "loss_abs_diff": abs(old_loss - new_loss),
        "grad_rel_diff_new_vs_old": rel(new_grads, old_grads),
        "auto_compute": auto.summary(),
        "auto_loss": auto_loss,
        "grad_rel_diff_auto_vs_fp32": rel(auto_grads, new_grads),
    }
    if out["grad_rel_diff_new_vs_old"] > 1e-4 or out["loss_abs_diff"] > 1e-4:
        raise RuntimeError(f"plain-tensor step differs from the MetaTensor step: {out}")
    return out


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def bench(args: list[str], out: Path, work: Path, timeout: int) -> dict[str, Any]:
    """``python -m fedct bench train-loop ARGS`` in a fresh interpreter; its JSON is copied to ``out``."""
    target = work / ("bench" + "".join(args).replace("-", "_"))
    cmd = [sys.executable, "-m", "fedct", "bench", "train-loop", *args, "--out", str(target)]
    print("   $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, text=True, capture_output=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    found = {}
    for path in sorted(target.glob("train_loop*.json")):
        shutil.copy(path, out / f"{target.name}-{path.name}")
        data = json.loads(path.read_text())
        found[path.name] = {
            "profile": data.get("profile"),
            "input_size": data.get("input_size"),
            "batch_size": data.get("batch_size"),
            "studies": data.get("studies"),
            "gpu": data.get("gpu"),
            "arms": {name: _headline(arm) for name, arm in data["arms"].items()},
        }
    if not found:
        raise RuntimeError(f"no train_loop JSON in {target}")
    return found


def _headline(arm: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "samples_per_second",
        "data_wait_fraction",
        "gpu_busy_fraction",
        "gpu_busy_fraction_unprofiled_estimate",
        "gpu_busy_fraction_nvidia_smi",
        "ratio_loop_to_limit",
        "peak_gpu_memory_mib",
        "steps_timed",
    )
    head = {k: arm.get(k) for k in keys if k in arm}
    head["compute"] = arm.get("compute")
    if "metatensor_ab" in arm:
        head["speedup_plain_over_metatensor"] = arm["metatensor_ab"]["speedup_plain_over_metatensor"]
    for limit in ("limit", "limit_fp32", "limit_cudnn_benchmark"):
        if limit in arm:
            head[f"{limit}_samples_per_second"] = arm[limit]["samples_per_second"]
    return head


def main(argv: list[str] | None = None) -> int:
    """Run every part; exit 0 when all passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT", "runs/gpu-check"), help="where the JSON goes (default $OUT)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes everywhere: proves the script on a CPU in a minute"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    size = ["--tiny"] if args.quick else []
    summary: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedct-gpu-check-") as tmp:
        work = Path(tmp)
        _step(summary, "environment", environment)
        _step(summary, "imports_without_flwr", imports_without_flwr)
        _step(summary, "compiles_on_this_python", compiles_on_this_python)
        _step(summary, "smoke_train_evaluate", smoke, work)
        _step(summary, "step_equivalence", step_equivalence)
        # The GPU profile first (the figure the issue asks for), then the CPU default size (CPU and CUDA arms).
        _step(summary, "bench_gpu_profile", bench, ["--profile", "gpu", *size], out, work, 300)
        _step(summary, "bench_default_profile", bench, size, out, work, 200)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    summary["all_ok"] = all(v.get("ok") for v in summary.values() if isinstance(v, dict) and "ok" in v)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    print(
        json.dumps({k: v for k, v in summary.items() if k not in ("environment",)}, indent=1, default=str)[-6000:],
        flush=True,
    )
    print(
        f"gpu_check: {'all parts ok' if summary['all_ok'] else 'SOME PARTS FAILED'}; wrote {out / 'gpu_check.json'}",
        flush=True,
    )
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
