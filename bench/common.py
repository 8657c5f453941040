"""Shared pieces of the benchmarks: machine description, JSON output, timing and peak memory of process trees."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Version of the JSON layout written by the benchmarks (bump when a key changes meaning).
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchOptions:
    """What every benchmark takes: where to write, and whether to run the quick (or the tiny test) size."""

    out: Path
    quick: bool = False
    tiny: bool = False  # the test suite's size: seconds, only checks that the benchmark works
    resume: bool = False  # quality: continue from ``quality.partial.json`` in ``out`` (same plan), skip finished arms
    profile: str = "default"  # train-loop: run config profile, "default" (CPU size) or "gpu" (configs/run-gpu.toml)
    devices: str = "auto"  # train-loop: "auto" (CPU, plus CUDA when present), "cpu" or "cuda"
    patients: int = 0  # train-loop: synthetic patients of the timed site (0: the size's default); more = longer epochs

    def __post_init__(self) -> None:
        if self.patients < 0:
            raise ValueError(f"patients must be >= 0 (0: the benchmark size's default), got {self.patients}")


def machine_info() -> dict[str, Any]:
    """CPU, memory, accelerator and library versions."""
    import torch

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "monai", "flwr", "pydicom", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported as such
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "versions": versions,
    }


def clean_json(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null; tuples become lists; Paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return clean_json(value.item())
    return value


def write_result(out: Path, name: str, payload: Mapping[str, Any], *, options: BenchOptions, started: float) -> Path:
    """Write ``<out>/<name>.json`` with the benchmark's payload, the machine, the mode and the wall time."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "schema_version": SCHEMA_VERSION,
        "mode": "tiny" if options.tiny else "quick" if options.quick else "full",
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "machine": machine_info(),
        # 1, 5 and 15 minute load averages when the result was written: other work on the machine skews timings
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        **payload,
    }
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean_json(document), indent=2))
    tmp.replace(path)
    return path


def summarise(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean, standard deviation (sample), min, max and median of the finite values; n counts them."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "median": None}
    return {
        "n": len(finite),
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "median": statistics.median(finite),
    }


def self_peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children = _children_of()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mib(pid: int) -> float:
    """Current resident memory of one process (MiB); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeMemorySampler:
    """Samples the summed resident memory of process trees in a background thread; keeps the peak of each name
    (a name may follow several roots, e.g. a SuperNode and its executor).

    ``with TreeMemorySampler({"all": os.getpid()}) as s: ...`` then ``s.peak_mib["all"]``. Sampling (every
    ``interval`` seconds) can miss a spike shorter than the interval.
    """

    def __init__(self, roots: Mapping[str, int | Sequence[int]], *, interval: float = 0.1) -> None:
        self.roots = {name: (pids,) if isinstance(pids, int) else tuple(pids) for name, pids in roots.items()}
        self.interval = interval
        self.peak_mib: dict[str, float] = dict.fromkeys(self.roots, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, name: str, pid: int) -> None:
        """Also follow the tree of ``pid`` from now on."""
        self.roots[name] = (pid,)
        self.peak_mib.setdefault(name, 0.0)

    def sample(self) -> None:
        """Take one sample now."""
        for name, roots in list(self.roots.items()):
            total = sum(rss_mib(pid) for pid in {p for root in roots for p in process_tree(root)})
            self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def median_after_first(values: Sequence[float]) -> float | None:
    """Median of all but the first value (the first round pays start-up); of all when there is only one."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


#: Run settings of the small sizes (tiny and quick): a small CNN on 16x16x16 inputs (as tests/federation.py).
SMALL_RUN_CONFIG: dict[str, Any] = {
    "model-name": "smallcnn",
    "input-size": "16,16,16",
    "target-spacing-mm": "16.0,16.0,16.0",
    "batch-size": 4,
    "learning-rate": 0.003,
}


#: Label noise of the randomised synthetic sites of the quality benchmark (issue #20.1: "some label noise").
RANDOMISED_LABEL_NOISE = 0.03


def synthetic_sites(
    root: Path,
    *,
    sites: int,
    patients_per_site: int,
    seed: int = 0,
    small: bool,
    images: tuple[int, float, float] | None = None,
    randomised: bool | float = False,
) -> Path:
    """Synthetic hospitals under ``root`` (reused when already written with the same settings by the same generator,
    :data:`synthetic.phantom.PHANTOM_VERSION`); returns ``root``.

    ``small``: 32x32 images with 12 mm pixels and 10 mm slices (seconds to write and ingest); otherwise the
    default non-IID profiles of ``synthetic.hospitals`` (vendor, slice thickness, noise, prevalence, size).
    ``images``: (rows, pixel mm, slice mm) of every site instead (the other profile differences kept).
    ``randomised``: domain-randomised studies and 3 % label noise (issue #20.1, :data:`RANDOMISED_LABEL_NOISE`); a
    number in (0, 1] is the randomisation's strength (``SiteProfile.domain_randomisation``).
    """
    from dataclasses import replace

    from synthetic.hospitals import default_profiles, write_federation
    from synthetic.phantom import PHANTOM_VERSION

    root = Path(root)
    wanted: dict[str, Any] = {
        "sites": sites,
        "patients_per_site": patients_per_site,
        "seed": seed,
        "small": small,
        "phantom_version": PHANTOM_VERSION,  # data an older generator wrote is rewritten, not reused
    }
    if images is not None:
        wanted["images"] = list(images)
    if randomised:
        wanted["randomised"] = float(randomised)  # 1.0 == True: one strength however it is given
    marker = root / "bench-federation.json"
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    profiles = default_profiles(sites)
    if images is not None:
        rows, pixel, thickness = images
        profiles = [replace(p, rows=rows, pixel_spacing_mm=pixel, slice_thickness_mm=thickness) for p in profiles]
    elif small:
        profiles = [replace(p, rows=32, pixel_spacing_mm=12.0, slice_thickness_mm=10.0) for p in profiles]
    if randomised:
        profiles = [replace(p, domain_randomisation=randomised, label_noise=RANDOMISED_LABEL_NOISE) for p in profiles]
    write_federation(
        root, sites=sites, patients_per_site=patients_per_site, seed=seed, profiles=profiles, overwrite=True
    )
    marker.write_text(json.dumps(wanted))
    return root


def site_names(data_root: Path) -> list[str]:
    """``site-*`` folder names under ``data_root`` (sorted, as Flower's simulation partitions them)."""
    return sorted(p.name for p in Path(data_root).glob("site-*") if p.is_dir())
