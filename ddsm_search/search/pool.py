"""Where candidate schedules are evaluated: in this process, or on Ray actors (local or a cluster).

Each Ray actor loads the supernet, its exported subnets and the reference statistics once, then
evaluates many schedules. A generation's schedules are sorted and dealt out in contiguous blocks, so
schedules that share a prefix tend to land on the same actor and reuse its latents. Actors restart
if they die and Ray re-runs their unfinished tasks (max_restarts / max_task_retries), so a dead
worker's candidate is retried, not lost.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Iterator, Sequence

from ..errors import DDSMError

Job = tuple[str, list[float]]  # (schedule key, widths)


def check_address(address: str, timeout: float = 5.0) -> None:
    """Raise DDSMError unless `address` ("HOST:PORT", "ray://HOST:PORT", "auto" or "local") is usable.

    A host and port must accept a TCP connection within `timeout` seconds: ray.init keeps retrying an
    address where nothing listens for minutes, and a user should hear about a typo at once.
    """
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise DDSMError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()  # [::1]:6379 too
    except OSError as exc:
        raise DDSMError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


class LocalPool:
    """Evaluates in this process: `--workers 0`, for debugging and tests."""

    def __init__(self, make_evaluator: Callable[[], object]):
        self.evaluator = make_evaluator()

    def run(self, jobs: Sequence[Job], samples: int) -> Iterator[tuple[str, dict, int]]:
        """Yield (key, result, worker index) for each job scored on `samples` images, in order."""
        for key, widths in jobs:
            yield key, self.evaluator.evaluate(widths, samples), 0

    def close(self) -> None:
        """Nothing to release."""


class RayPool:
    """Evaluates on `workers` Ray actors; starts a local Ray unless `address` names a cluster."""

    def __init__(self, workers: int, evaluator_args: dict, address: str | None = None, threads: int | None = None):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silences a token warning on a local Ray
        import ray

        from .evaluator import Evaluator

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            if address:
                check_address(address)
                try:
                    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                except ConnectionError as exc:  # "auto" with no cluster running, or a refused handshake
                    raise DDSMError(f"--address {address}: {str(exc).splitlines()[0]}") from None
            else:
                # "local": a Ray of our own, even when `ray start` left a cluster running on this machine
                # (plain ray.init() would attach to it, and refuse num_cpus)
                ray.init(address="local", num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False,
                         logging_level="ERROR", log_to_driver=False)
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // workers) if not address else None
        gpus = 1 if evaluator_args.get("device") == "cuda" else 0  # one GPU per actor when sampling on CUDA
        actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=3, max_task_retries=3)(Evaluator)
        self.actors = [actor.remote(**evaluator_args, threads=threads) for _ in range(workers)]

    def run(self, jobs: Sequence[Job], samples: int) -> Iterator[tuple[str, dict, int]]:
        """Yield (key, result, worker index) as evaluations on `samples` images finish."""
        jobs = sorted(jobs, key=lambda job: job[1])
        n = len(self.actors)
        blocks = [jobs[i * len(jobs) // n:(i + 1) * len(jobs) // n] for i in range(n)]
        pending = {}
        for index, block in enumerate(blocks):
            for key, widths in block:
                pending[self.actors[index].evaluate.remote(widths, samples)] = (key, index)
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            key, index = pending.pop(done[0])
            yield key, self.ray.get(done[0]), index

    def close(self) -> None:
        """Stop the actors, and Ray if this pool started it."""
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()
