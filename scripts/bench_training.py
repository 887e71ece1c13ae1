"""Training throughput of the supernet: sandwich-rule steps per second and images per second.

Runs the real training step (`TrainingRun.train_step`) on random images of the experiment's shape
(the cost does not depend on the pixel values), after a warm-up, and prints one table.

    python scripts/bench_training.py                                   # digits on CPU
    python scripts/bench_training.py --config search_spaces/cifar10.yaml --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import pandas as pd
import torch

from ddsm_search.config import load_config
from ddsm_search.data import ImageData
from ddsm_search.sampling import resolve_device
from ddsm_search.training import TrainingRun, grid_subnets


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    """Time training steps for the sandwich rule and for each subnet of the grids alone; print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="search_spaces/digits.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    cfg = load_config(args.config)
    device = resolve_device(args.device)
    shape = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}.get(cfg.data.kind, (3, cfg.data.image_size or 32, cfg.data.image_size or 32))
    images = torch.randint(0, 256, (512, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    run = TrainingRun(cfg, ImageData("random", images, 255), device)
    print(f"{datetime.date.today()} | {device}: {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or platform.machine()}"
          f" | torch {torch.__version__} | {cfg.name} {shape} batch {cfg.train.batch_size}")

    rows = []
    # the sandwich rule's draw, then one subnet per step: that subnet's forward and backward alone
    for label, subnets in [("sandwich", None)] + [(f"{s} only", [s]) for s in grid_subnets(run.model.space)]:
        for _ in range(3):
            run.train_step(subnets)
        _sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            run.train_step(subnets)
        _sync(device)
        seconds = (time.perf_counter() - started) / args.steps
        rows.append({"what": label, "ms/step": round(seconds * 1000, 1), "steps/s": round(1 / seconds, 2),
                     "images/s": round(cfg.train.batch_size / seconds, 1)})
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
