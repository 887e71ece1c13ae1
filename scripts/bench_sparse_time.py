"""Does an unstructured mask save time? Dense, masked and sparse-CSR kernels side by side, in one run.

For each linear layer of a DiT block (qkv, proj, fc1, fc2 at full width) and each density (0.75, 0.5,
0.25 by default), with the rows one sampling step feeds it (batch x tokens), this times
- dense: F.linear with the full weight (what an unmasked supernet runs);
- masked: the same F.linear with the masked weights zero (what a sparse supernet runs: dense kernels
  multiply the zeros too, so the time should equal dense's);
- csr: the masked weight as a torch sparse CSR tensor (W_csr @ x^T), the kernel that could skip them;
then a whole DiT forward pass at full size, dense against masked at each density. "dense again" times
the dense kernel a second time in the same rotation: its ratio to dense is this machine's noise floor. Timings are the
median of `--repeats` turns taken in rotation (dense, masked, csr, dense, ...) so drift in machine
speed hits every kernel alike; ratios are dense time / other time (above 1: faster than dense).
CUDA's 2:4 semi-structured kernels are timed as well where a GPU is present (`--device cuda`).

    python scripts/bench_sparse_time.py --out /tmp/bench_sparse_time            # digits DiT and DiT-S shapes
    python scripts/bench_sparse_time.py --configs search_spaces/digits-dit.yaml --batch 500 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ddsm_search.backbones.registry import build_supernet
from ddsm_search.config import SparsityConfig, load_config
from ddsm_search.methods.sparsity.masks import Sparsifier


def cpu_name() -> str:
    """Return the CPU's model name and its vector extensions that matter here."""
    name = platform.processor()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    ext = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({ext}, torch {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def timed(fns: dict[str, callable], repeats: int, inner: int) -> dict[str, float]:
    """Return each function's median seconds per call over `repeats` turns taken in rotation."""
    for fn in fns.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            started = time.perf_counter()
            for _ in range(inner):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[key].append((time.perf_counter() - started) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_rows(cfg, image_shape, batch: int, densities, repeats: int, inner: int, device: str) -> list[dict]:
    """Time every linear of the first DiT block at each density: dense, masked, CSR (and 2:4 on CUDA)."""
    net = build_supernet(cfg.model, image_shape)
    tokens = (image_shape[1] // cfg.model.patch_size) * (image_shape[2] // cfg.model.patch_size)
    block = net.blocks[0]
    layers = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        w = layer.weight.detach().to(device)
        x = torch.randn(batch * tokens, w.shape[1], generator=g).to(device)
        for density in densities:
            mask = torch.rand(w.shape, generator=g).to(device) < density
            masked = w * mask
            again = w.clone()  # the noise floor: dense timed a second time, in the same rotation
            fns = {"dense": lambda: F.linear(x, w), "dense again": lambda: F.linear(x, again),
                   "masked": lambda: F.linear(x, masked)}
            if device == "cpu":
                csr, xt = masked.to_sparse_csr(), x.t().contiguous()
                fns["csr"] = lambda: torch.sparse.mm(csr, xt)
            else:
                fns.update(_two_four(w, x))
            got = timed(fns, repeats, inner)
            row = {"config": cfg.name, "layer": name, "shape": f"{w.shape[1]}->{w.shape[0]}", "rows": x.shape[0],
                   "density": density, **{f"{k} ms": v * 1e3 for k, v in got.items()}}
            row.update({f"{k} speed-up": got["dense"] / v for k, v in got.items() if k != "dense"})
            rows.append(row)
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    return rows


def _two_four(w: torch.Tensor, x: torch.Tensor) -> dict:
    """CUDA only: half-precision dense against 2:4 semi-structured sparse (two of every four kept)."""
    from torch.sparse import to_sparse_semi_structured

    wh, xh = w.half(), x.half()
    keep = wh.abs().reshape(-1, 4).argsort(dim=1, descending=True)[:, :2]
    mask = torch.zeros_like(wh.reshape(-1, 4), dtype=torch.bool).scatter_(1, keep, True).reshape(wh.shape)
    sparse = to_sparse_semi_structured(wh * mask)
    return {"dense fp16": lambda: F.linear(xh, wh), "2:4 fp16": lambda: F.linear(xh, sparse)}


def model_rows(cfg, image_shape, batch: int, densities, repeats: int, device: str) -> list[dict]:
    """Time one full-size forward pass of the DiT supernet: dense weights against masked ones."""
    rows = []
    dense = build_supernet(cfg.model, image_shape).to(device).eval()
    x = torch.randn(batch, *image_shape, device=device)
    t = torch.full((batch,), 500, device=device)
    for density in densities:
        masked = build_supernet(cfg.model, image_shape).eval()
        masked.load_state_dict(dense.state_dict())
        Sparsifier(SparsityConfig("static", density), masked, 1, 0).apply(masked)
        masked = masked.to(device)
        with torch.no_grad():
            got = timed({"dense": lambda: dense(x, t), "dense again": lambda: dense(x, t),
                         "masked": lambda: masked(x, t)}, repeats, 1)
        rows.append({"config": cfg.name, "layer": "whole forward (full size)", "rows": batch, "density": density,
                     "dense ms": got["dense"] * 1e3, "dense again ms": got["dense again"] * 1e3,
                     "masked ms": got["masked"] * 1e3, "dense again speed-up": got["dense"] / got["dense again"],
                     "masked speed-up": got["dense"] / got["masked"]})
        print(f"  whole forward, density {density}: dense {got['dense'] * 1e3:.2f} ms, masked "
              f"{got['masked'] * 1e3:.2f} ms ({got['dense'] / got['masked']:.2f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["search_spaces/digits-dit.yaml", "search_spaces/cifar10-dit.yaml"])
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 500 digits, 16 CIFAR)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5, help="calls per timing turn")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="/tmp/bench_sparse_time")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = cpu_name() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{datetime.date.today()} | {machine}", flush=True)
    rows = []
    for path in args.configs:
        cfg = load_config(path)
        shape = (3, 32, 32) if cfg.data.kind == "cifar10" else (1, 8, 8)
        batch = args.batch or (500 if cfg.data.kind == "digits" else 16)
        print(f"{cfg.name}: hidden {cfg.model.hidden_size}, batch {batch}", flush=True)
        rows += layer_rows(cfg, shape, batch, args.densities, args.repeats, args.inner, args.device)
        rows += model_rows(cfg, shape, batch, args.densities, max(3, args.repeats // 2), args.device)
    table = pd.DataFrame(rows)
    table.to_csv(out / "bench_sparse_time.csv", index=False)
    ups = [c for c in table.columns if c.endswith("speed-up")]
    summary = table.groupby(["config", "density"])[ups].agg(["min", "median", "max"]).round(3)
    text = (f"{datetime.date.today()} | {machine}\n"
            + table.to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n\nspeed-up over dense "
            "(dense time / time; above 1 is faster), min / median / max over layers:\n" + summary.to_string() + "\n")
    verdict = []
    if "csr speed-up" in table:
        best = table["csr speed-up"].max()
        verdict.append(f"torch sparse CSR is {'faster than dense somewhere' if best > 1.05 else 'never faster than dense'}"
                       f" here (best {best:.2f}x over {table['csr speed-up'].notna().sum()} layer x density cases)")
    masked, floor = table["masked speed-up"], table["dense again speed-up"]
    verdict.append(f"masked weights in dense kernels: speed-up {masked.median():.2f}x median ({masked.min():.2f}x-"
                   f"{masked.max():.2f}x over cases), against the same dense kernel timed twice {floor.median():.2f}x "
                   f"median ({floor.min():.2f}x-{floor.max():.2f}x): the noise floor of this machine; the zeros are "
                   "multiplied like any weight, so unstructured masks save no time in dense kernels")
    text += "\n".join(verdict) + "\n"
    (out / "bench_sparse_time.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
