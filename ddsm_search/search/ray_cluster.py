"""Joining Ray: a cluster at an address (checked first, so a typo is one line at once), the cluster of a
`ray job submit` job, or a Ray of this process's own. Both executors (pool, Tune) connect here."""

from __future__ import annotations

import os
import socket

from ..errors import DDSMError


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


def connect_ray(address: str | None, workers: int) -> bool:
    """Join the Ray cluster at `address`, or start a Ray of this process's own; return True if this call
    started or joined it (False: Ray was already initialised, and is left as it is)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silences a token warning on a local Ray
    import ray

    if ray.is_initialized():
        return False
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
    return True


def in_ray_job() -> bool:
    """Return True if this process is the entrypoint of a Ray job (`ray job submit`): Ray's job
    supervisor sets its config, and RAY_ADDRESS to the cluster the job was submitted to."""
    return "job_submission_id" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") and bool(
        os.environ.get("RAY_ADDRESS"))
