"""Pick each subnet's backend by a short measurement on this machine, kept per machine on disk.

`choose(denoisers, batch, mode)` returns one denoiser per subnet: with mode "torch" or "fused" that
backend (the kernel where it can run the subnet), with "auto" the faster of the two on a probe batch
of that size, timed once (best of a few calls after a warm-up) and remembered in
<cache>/backends/<machine>.json under the network's shape and the batch size. The machine key names
the CPU, its vector extensions, torch's version and thread count: a choice holds only where it was
measured.
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from pathlib import Path

import torch

from ..errors import DDSMError
from ..io import write_json_atomic
from . import BACKENDS, CHOICES, runs_fused, supports, wrap


def cpu_name() -> str:
    """Return this machine's CPU model name (from /proc/cpuinfo where there is one): what benchmarks
    print beside their figures, and part of `machine_key`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """Return a short name of this machine's CPU, vector extensions, torch version and threads."""
    # torch's own reading of the vector extensions its kernels use (DEFAULT, AVX2, AVX512, ...)
    text = (f"{cpu_name()}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}|"
            f"threads {torch.get_num_threads()}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def net_key(net: torch.nn.Module, image_shape: tuple, batch: int) -> str:
    """Return the key of a static network's timing: its class, parameter shapes, image shape, batch."""
    shapes = repr([tuple(p.shape) for p in net.parameters()])
    digest = hashlib.sha256(f"{type(net).__name__}|{shapes}".encode()).hexdigest()[:16]
    return f"{type(net).__name__}-{digest}|{'x'.join(map(str, image_shape))}|batch {batch}"


def _seconds(denoiser, x: torch.Tensor, repeats: int) -> float:
    """Return the fastest of `repeats` timed calls (after one untimed warm-up)."""
    t = torch.tensor(500, device=x.device)
    with torch.inference_mode():
        denoiser(x, t)
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            denoiser(x, t)
            best = min(best, time.perf_counter() - started)
    return best


class ChoiceCache:
    """Timings of static networks per backend on this machine, read from and written to one JSON file."""

    def __init__(self, cache_dir: str | Path | None = None):
        from ..io import cache_dir as default_cache_dir
        from ..io import read_json

        self.path = Path(cache_dir or default_cache_dir()) / "backends" / f"{machine_key()}.json"
        try:
            self.entries = read_json(self.path) if self.path.is_file() else {}
        except DDSMError:
            self.entries = {}  # a damaged cache is measured again, not trusted

    def get(self, key: str) -> dict | None:
        """Return the stored {backend: seconds} of `key`, or None."""
        entry = self.entries.get(key)
        return entry if isinstance(entry, dict) and all(b in entry for b in BACKENDS) else None

    def put(self, key: str, timings: dict) -> None:
        """Store timings and rewrite the file (atomically; a read-only cache only stays in memory)."""
        self.entries[key] = timings
        try:
            write_json_atomic(self.path, self.entries)
        except OSError:
            pass


def choose(nets: dict, image_shape: tuple, batch: int, mode: str = "auto", device: str = "cpu",
           cache: ChoiceCache | None = None, repeats: int = 3) -> dict:
    """Return {subnet: denoiser} for static `nets` ({subnet: network}) on backend `mode` at `batch`."""
    if mode not in CHOICES:
        raise DDSMError(f"unknown backend {mode!r} (choose from {', '.join(CHOICES)})")
    out = {}
    probe = None
    for subnet, net in nets.items():
        if mode == "torch" or device != "cpu" or not supports("fused", net):
            out[subnet] = net
            continue
        fused = wrap(net, "fused")
        if probe is None:
            probe = torch.randn((batch, *image_shape), generator=torch.Generator().manual_seed(0))
        if mode == "fused" or not runs_fused(fused, probe):
            out[subnet] = fused  # "fused" where the kernel can run it, torch's layers elsewhere
            continue
        cache = cache or ChoiceCache()
        key = net_key(net, image_shape, batch)
        timings = cache.get(key)
        if timings is None:
            timings = {"fused": _seconds(fused, probe, repeats), "torch": _seconds(net, probe, repeats)}
            cache.put(key, timings)
        out[subnet] = fused if timings["fused"] <= timings["torch"] else net
    return out
