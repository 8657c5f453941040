"""Cost of the training augmentation (issue #20.3): milliseconds per batch on the CPU, on and off.

Times ``Compose(random_transforms(...))`` per sample over a batch of window-scaled volumes of the model's input size
(what the loader does after the cache) and :class:`preprocessing.transforms.BatchAugment` (the GPU path's form, here
on the CPU). Writes ``augment.json``.

    PYTHONPATH=. nice -n 10 .venv/bin/python -m bench.augment --out /tmp/aug
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path


def measure(
    *, input_size: tuple[int, int, int] = (64, 64, 48), batch_size: int = 4, batches: int = 8, seed: int = 0
) -> dict:
    """Median and mean milliseconds per batch: loader form with augmentation on and off, and BatchAugment."""
    import statistics

    import torch
    from monai.transforms import Compose

    from preprocessing.transforms import AugmentConfig, BatchAugment, PipelineConfig, random_transforms

    if batch_size < 1 or batches < 1:
        raise ValueError(f"batch_size and batches must be >= 1, got {batch_size} and {batches}")
    cfg = PipelineConfig(input_size=input_size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((batches, batch_size, 1, *input_size), generator=generator)

    def timed(fn) -> dict[str, float]:
        fn(images[0])  # warm-up
        times = []
        for batch in images:
            t0 = time.perf_counter()
            fn(batch)
            times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times)}

    def loader_form(augment: AugmentConfig):
        chain = Compose(random_transforms(cfg, augment=augment))
        chain.set_random_state(seed=seed)
        return lambda batch: [chain({"image": sample})["image"] for sample in batch]

    return {
        "input_size": list(input_size),
        "batch_size": batch_size,
        "batches": batches,
        "loader_augment_on": timed(loader_form(AugmentConfig())),
        "loader_augment_off": timed(loader_form(AugmentConfig(enabled=False))),
        "batch_augment_cpu": timed(BatchAugment(cfg, seed=seed)),
        "augment_config": AugmentConfig().to_dict(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="16^3 volumes, 2 batches: checks that it runs")
    args = p.parse_args(argv)
    result = measure(input_size=(16, 16, 16), batches=2) if args.tiny else measure()
    payload = {
        "what": "milliseconds per training batch spent in the random augmentation, CPU",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "augment.json").write_text(json.dumps(payload, indent=1))
    print(
        json.dumps({k: payload[k] for k in ("loader_augment_on", "loader_augment_off", "batch_augment_cpu")}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
