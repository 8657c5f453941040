"""Preprocessing throughput: fedct's ingestion against the read floor and against the obvious MONAI pipeline.

On realistic CT series (512x512, 100-300 slices in the full size), uncompressed and JPEG 2000 / JPEG-LS
lossless, three arms turn the same folders into volumes, each with both cores (two worker processes):

(a) read floor: pydicom reads every file, the modality LUT (RescaleSlope/Intercept) is applied and the slices
    are stacked in position order — nothing else;
(b) what a user would write from the MONAI tutorials: ``LoadImaged(reader="PydicomReader")`` +
    ``EnsureChannelFirstd`` + ``Orientationd`` + ``Spacingd`` + ``ScaleIntensityRanged`` + ``Resized`` to the
    model input (no validation);
(c) fedct's ingestion (``preprocessing.ingest.ingest_site``): discovery, header validation, pseudonyms,
    the model input (the deterministic pipeline's values, in numpy: no torch or MONAI in any of its processes)
    into the cache, manifest and report — model-ready arrays.

Arms are interleaved repetition by repetition in one run, each in a fresh process whose tree's peak resident
memory is sampled. Writes ``preprocess.json`` (series per second per arm and transfer syntax, ratios c/a, c/b).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import BenchOptions, TreeMemorySampler, ratio, summarise, write_result

ARMS = {
    "a_read_floor": "pydicom read + modality LUT + stack (the floor)",
    "b_monai_tutorial": "LoadImaged(PydicomReader) + EnsureChannelFirstd + Orientationd + Spacingd + ScaleIntensityRanged + Resized",
    "c_fedct_ingest": "fedct ingest_site: discover, validate, model input on the grid (numpy), cache, manifest, report",
}
SYNTAXES = ("uncompressed", "jpeg2000_lossless", "jpegls_lossless")
SPACING_MM = (5.0, 5.0, 5.0)
INPUT_SIZE = (64, 64, 48)


def _sizes(options: BenchOptions) -> dict[str, Any]:
    """Series sizes (rows = columns, slices per series) and repetitions of each size."""
    if options.tiny:
        return {"rows": 32, "slices": [10, 12], "repeats": 1}
    if options.quick:
        return {"rows": 512, "slices": [48, 64], "repeats": 1}
    return {"rows": 512, "slices": [100, 200, 300], "repeats": 3}


def _write_series(folder: Path, *, rows: int, slices: int, index: int) -> list[Path]:
    """One uncompressed CT series of a chest phantom, ``slices`` axial slices over ~300 mm."""
    import numpy as np
    from scipy import ndimage

    from synthetic.dicom_writer import PatientIdentity, write_ct_series
    from synthetic.phantom import chest_phantom

    extent_mm = 300.0 if rows >= 256 else slices * 10.0
    base = min(slices, 100)  # the phantom at <= 100 slices, interpolated along z beyond (memory)
    pixel = 350.0 / rows
    hu = chest_phantom(
        shape=(base, rows, rows),
        pixel_spacing_mm=(pixel, pixel),
        slice_spacing_mm=extent_mm / base,
        diagnosis=("covid", "other_pneumonia", "normal")[index % 3],
        burden=0.3,
        noise_hu=20.0,
        rng=np.random.default_rng(index),
    )
    if slices != base:
        hu = ndimage.zoom(hu, (slices / base, 1.0, 1.0), order=1)
    uid = f"1.2.826.0.1.3680043.10.1234.{index + 1}"
    patient = PatientIdentity(
        PatientName=f"Bench^{index}",
        PatientID=f"BENCH{index}",
        PatientBirthDate="19600101",
        PatientSex="F",
        PatientAge="064Y",
    )
    return write_ct_series(
        folder,
        hu,
        pixel_spacing_mm=(pixel, pixel),
        slice_spacing_mm=extent_mm / slices,
        study_instance_uid=f"{uid}.1",
        series_instance_uid=f"{uid}.2",
        patient=patient,
        uid_entropy=("bench-preprocess", index),
    )


def _compress_copy(source: Path, target: Path, syntax: str) -> None:
    """Copy a series folder re-encoded in a lossless compressed transfer syntax (pydicom's encoders)."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    uid = {"jpeg2000_lossless": JPEG2000Lossless, "jpegls_lossless": JPEGLSLossless}[syntax]
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.compress(uid)
        ds.save_as(target / path.name, enforce_file_format=True)


def _encoder_available(syntax: str) -> str | None:
    """None when pydicom can encode ``syntax`` here, else why not."""
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    uid = {"jpeg2000_lossless": JPEG2000Lossless, "jpegls_lossless": JPEGLSLossless}[syntax]
    encoder = get_encoder(uid)
    if not encoder.is_available:
        return f"no pydicom encoder for {syntax} installed (pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS)"
    return None


def prepare_data(root: Path, options: BenchOptions) -> dict[str, list[Path]]:
    """Series folders per transfer syntax under ``root/<syntax>/series-<n>/`` (reused when already written)."""
    sizes = _sizes(options)
    root = Path(root)
    wanted = f"{sizes['rows']}:{sizes['slices']}"
    marker = root / "bench-series.txt"
    folders: dict[str, list[Path]] = {}
    if not (marker.is_file() and marker.read_text() == wanted):
        shutil.rmtree(root, ignore_errors=True)
        for i, n in enumerate(sizes["slices"]):
            _write_series(root / "uncompressed" / f"series-{i}", rows=sizes["rows"], slices=n, index=i)
        for syntax in SYNTAXES[1:2] if options.tiny else SYNTAXES[1:]:
            if _encoder_available(syntax) is None:
                for i in range(len(sizes["slices"])):
                    _compress_copy(root / "uncompressed" / f"series-{i}", root / syntax / f"series-{i}", syntax)
        marker.write_text(wanted)
    for syntax in SYNTAXES:
        if (root / syntax).is_dir():
            folders[syntax] = sorted(p for p in (root / syntax).iterdir() if p.is_dir())
    return folders


def _worker_init() -> None:
    """One torch thread per worker where the arm uses torch (b); the floor (a) never imports it."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def read_floor(folder: str) -> tuple[int, ...]:
    """Arm (a) for one series: pydicom read, modality LUT, stack by slice position. Returns the volume's shape."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_modality_lut

    slices = []
    for path in sorted(Path(folder).iterdir()):
        ds = pydicom.dcmread(path)
        slices.append((float(ds.ImagePositionPatient[2]), apply_modality_lut(ds.pixel_array, ds).astype(np.float32)))
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1] for s in slices]).shape


def monai_tutorial(folder: str) -> tuple[int, ...]:
    """Arm (b) for one series: the MONAI tutorial chain to the model input. Returns the tensor's shape."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Resized,
        ScaleIntensityRanged,
        Spacingd,
    )

    chain = Compose(
        [
            LoadImaged(keys="image", reader="PydicomReader"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=SPACING_MM, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=400.0, b_min=0.0, b_max=1.0, clip=True),
            Resized(keys="image", spatial_size=INPUT_SIZE),
        ]
    )
    return tuple(chain({"image": folder})["image"].shape)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished (joined) children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _run_arm(arm: str, folders: list[str], dicom_root: str, site_dir: str, queue: Any) -> None:
    """Child process: run one arm over the folders with two workers; put (seconds, CPU seconds, worker memory,
    shapes or error) on the queue."""
    import resource

    try:
        t0 = time.perf_counter()
        cpu0 = _cpu_seconds()
        if arm == "c_fedct_ingest":
            from preprocessing.ingest import ingest_site
            from preprocessing.pipeline import PipelineConfig

            startup = time.perf_counter() - t0
            manifest = ingest_site(
                Path(dicom_root),
                Path(site_dir),
                pipeline=PipelineConfig(target_spacing_mm=SPACING_MM, input_size=INPUT_SIZE),
                workers=2,
            )
            seconds = time.perf_counter() - t0
            if len(manifest.studies) != len(folders):
                raise RuntimeError(
                    f"ingest accepted {len(manifest.studies)} of {len(folders)} series (see {site_dir}/ingest_report.json)"
                )
            shapes = [list(INPUT_SIZE)] * len(folders)
        else:
            function = read_floor if arm == "a_read_floor" else monai_tutorial
            if arm == "b_monai_tutorial":
                import monai.transforms  # noqa: F401 - imported before the fork, as ingest does
            startup = time.perf_counter() - t0
            # Forked workers, as ingest_site starts its own (see preprocessing.ingest.pool_context): the arm runs in a
            # spawned process, where the default would spawn workers that import everything again.
            context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=2, initializer=_worker_init, mp_context=context) as pool:
                shapes = [list(s) for s in pool.map(function, folders)]
            seconds = time.perf_counter() - t0
        worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker (Linux: KiB)
        queue.put(
            {
                "seconds": seconds,
                "cpu_seconds": _cpu_seconds() - cpu0,
                "startup_seconds": startup,
                "worker_peak_rss_mib": worker_peak,
                "shapes": shapes,
            }
        )
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _memory_probe_worker(item: dict[str, Any], site_dir: str) -> dict[str, float]:
    """In a fresh forked worker: peak memory while fedct turns one series into its cached model input.

    ``VmHWM`` (the kernel's RSS high-water mark) is reset through ``/proc/self/clear_refs`` first, so the growth is
    what this series cost on top of the worker's inherited pages; tracemalloc's peak (Python + NumPy buffers) is the
    same from the allocator's side.
    """
    import tracemalloc

    from preprocessing.ingest import _cache_one
    from preprocessing.pipeline import PipelineConfig

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    before = status("VmRSS")
    tracemalloc.start()
    result = _cache_one((item, PipelineConfig(target_spacing_mm=SPACING_MM, input_size=INPUT_SIZE), site_dir, None))
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    if result[1] is not None:
        raise RuntimeError(f"memory probe: series refused: {result[1]}: {result[2]}")
    return {
        "rss_before_mib": before,
        "rss_high_water_growth_mib": status("VmHWM") - before if resettable else None,
        "tracemalloc_peak_mib": traced_peak,
    }


def memory_probe(folder: Path, site_dir: Path) -> dict[str, Any]:
    """Peak memory of one worker for the series in ``folder`` against its raw pixel bytes (the issue's <= 1.5x)."""
    from preprocessing.cache import file_state_fingerprint
    from preprocessing.discover import discover
    from preprocessing.ingest import _worker_init, pool_context
    from preprocessing.validate import validate_series
    from preprocessing.volume import series_to_dict

    [headers] = discover(folder).series.values()
    series = validate_series(headers)
    item = {"image": series_to_dict(series), "content": file_state_fingerprint(series.paths), "id": "probe"}
    raw_mib = series.Rows * series.Columns * len(series.paths) * 2 / 2**20  # 16-bit stored values
    with ProcessPoolExecutor(max_workers=1, initializer=_worker_init, mp_context=pool_context()) as pool:
        measured = pool.submit(_memory_probe_worker, item, str(site_dir)).result()
    shutil.rmtree(site_dir, ignore_errors=True)
    growth = measured["rss_high_water_growth_mib"]
    return {
        "series_slices": len(series.paths),
        "raw_pixel_mib": raw_mib,
        **measured,
        "rss_growth_over_raw": growth / raw_mib if growth is not None else None,
        "tracemalloc_peak_over_raw": measured["tracemalloc_peak_mib"] / raw_mib,
    }


def _measure(arm: str, folders: list[Path], dicom_root: Path, site_dir: Path) -> dict[str, Any]:
    """Run one arm in a fresh (spawned) process; its wall time inside, and the peak RSS of its process tree."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_run_arm, args=(arm, [str(f) for f in folders], str(dicom_root), str(site_dir), queue))
    process.start()
    with TreeMemorySampler({"arm": process.pid}, interval=0.05) as sampler:
        result = queue.get(timeout=3600)
        process.join(timeout=60)
    if process.is_alive():
        process.kill()
    shutil.rmtree(site_dir, ignore_errors=True)
    return {**result, "peak_rss_mib": sampler.peak_mib["arm"]}


def run(options: BenchOptions) -> Path:
    """Run the benchmark and write ``preprocess.json``; returns its path."""
    started = time.perf_counter()
    load_start = os.getloadavg()
    out = Path(options.out)
    work = out / "work" / "preprocess"
    sizes = _sizes(options)
    t0 = time.perf_counter()
    folders = prepare_data(work / "data", options)
    data_seconds = time.perf_counter() - t0
    results: dict[str, Any] = {}
    for syntax in SYNTAXES[:2] if options.tiny else SYNTAXES:  # tiny: one codec is enough to check the code
        if syntax not in folders:
            results[syntax] = {"skipped": _encoder_available(syntax) or "no data"}
            continue
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        for repeat in range(sizes["repeats"]):
            for arm in ARMS:  # interleaved: a drift in machine load hits every arm alike
                runs[arm].append(
                    _measure(arm, folders[syntax], work / "data" / syntax, work / f"site-{syntax}-{repeat}")
                )
        n_series = len(folders[syntax])
        n_files = sum(len(list(f.glob("*.dcm"))) for f in folders[syntax])
        mib = sum(p.stat().st_size for f in folders[syntax] for p in f.glob("*.dcm")) / 2**20
        entry: dict[str, Any] = {"series": n_series, "files": n_files, "size_mib": mib, "arms": {}}
        for arm, arm_runs in runs.items():
            errors = [r["error"] for r in arm_runs if "error" in r]
            seconds = [r["seconds"] for r in arm_runs if "seconds" in r]
            median = summarise(seconds)["median"]
            cpu = [r["cpu_seconds"] for r in arm_runs if "cpu_seconds" in r]
            cpu_median = summarise(cpu)["median"]
            startup = summarise([r["startup_seconds"] for r in arm_runs if "startup_seconds" in r])["median"]
            worker_peak = max((r["worker_peak_rss_mib"] for r in arm_runs if "worker_peak_rss_mib" in r), default=None)
            entry["arms"][arm] = {
                "seconds": summarise(seconds),
                "series_per_second": n_series / median if median else None,
                "cpu_seconds": summarise(cpu),
                "cpu_seconds_per_series": cpu_median / n_series if cpu_median else None,
                "series_per_cpu_second": n_series / cpu_median if cpu_median else None,
                "startup_seconds": startup,
                "seconds_after_startup": median - startup if median and startup is not None else None,
                "worker_peak_rss_mib": worker_peak,
                "slices_per_second": n_files / median if median else None,
                "peak_rss_mib": max((r["peak_rss_mib"] for r in arm_runs), default=None),
                "output_shape": arm_runs[0].get("shapes", [None])[0],
                **({"errors": errors} if errors else {}),
            }
        sps = {arm: entry["arms"][arm]["series_per_second"] for arm in ARMS}
        entry["ratio_c_over_a"] = ratio(sps["c_fedct_ingest"], sps["a_read_floor"])
        entry["ratio_c_over_b"] = ratio(sps["c_fedct_ingest"], sps["b_monai_tutorial"])
        per_cpu = {arm: entry["arms"][arm]["series_per_cpu_second"] for arm in ARMS}
        entry["per_core_ratio_c_over_a"] = ratio(per_cpu["c_fedct_ingest"], per_cpu["a_read_floor"])
        entry["per_core_ratio_c_over_b"] = ratio(per_cpu["c_fedct_ingest"], per_cpu["b_monai_tutorial"])
        after = {arm: entry["arms"][arm]["seconds_after_startup"] for arm in ARMS}
        entry["ratio_c_over_a_after_startup"] = ratio(after["a_read_floor"], after["c_fedct_ingest"])
        largest = folders[syntax][int(max(range(len(sizes["slices"])), key=lambda i: sizes["slices"][i]))]
        entry["c_worker_memory_largest_series"] = memory_probe(largest, work / f"site-{syntax}-memory")
        results[syntax] = entry
    payload = {
        "what": "series per second (median over repeats) of three ways from DICOM files to volumes, each with 2 worker "
        "processes, arms interleaved in one run; ratio_c_over_a = fedct / read floor (1 = as fast as only decoding), "
        "ratio_c_over_b = fedct / MONAI tutorial chain (> 1 = fedct faster). Peak RSS = the arm's process tree, sampled every 50 ms.",
        "arms": ARMS,
        "series_rows_columns": sizes["rows"],
        "series_slices": sizes["slices"],
        "repeats": sizes["repeats"],
        "target_spacing_mm": list(SPACING_MM),
        "input_size": list(INPUT_SIZE),
        "data_preparation_seconds": data_seconds,
        "workers": 2,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
        "per_core": "cpu_seconds = user + system CPU of the arm's process and its workers (robust to other load); "
        "series_per_cpu_second and per_core_ratio_* compare work per core (c's workers are forked children of the arm, "
        "so their CPU counts; up to 2026-12-04 they came from a fork server and did not); startup_seconds = imports "
        "before the first series (torch + MONAI for b; c imports neither); worker_peak_rss_mib = ru_maxrss of the largest worker "
        "(pages shared with the parent count); c_worker_memory_largest_series = one forked worker's RSS high-water growth "
        "and tracemalloc peak while fedct caches the largest series, against its raw 16-bit pixel bytes",
        "results": results,
    }
    return write_result(out, "preprocess", payload, options=options, started=started)
