"""A search submitted with `ray job submit` to a head started apart (`ray start --head`) finishes, on
that cluster's workers, and leaves the run's files where --out says."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_dict

SEARCH = {"steps": 6, "segments": 3, "population": 4, "generations": 1, "samples": 40, "workers": 2, "batch_size": 40}
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head with the job server, in a process group of its own (stopped by its id, not `ray stop`,
    which would stop every Ray on the machine); yields its dashboard's address and its environment."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what `ray start` checks before it starts the dashboard
    except ImportError as exc:
        pytest.skip(f"the Ray job server needs the dashboard's packages (pip install 'ray[default]'): {exc}")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    dashboard = _free_port()
    ports = [f"--port={_free_port()}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}"]
    log = open(Path(temp) / "ray-start.log", "w")
    head = subprocess.Popen([str(Path(bin_dir) / "ray"), "start", "--head", "--block", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                             f"--temp-dir={temp}", *ports], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if head.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the Ray head's job server did not start: {(Path(temp) / 'ray-start.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield address, env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
            head.wait(15)
        except subprocess.TimeoutExpired:  # it waits for a graceful stop: the rest of its group goes at once
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(15)
        except ProcessLookupError:
            pass
        log.close()


def test_search_submitted_as_a_ray_job_finishes_on_the_cluster(tiny_supernet, tmp_path, ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    address, env = ray_head
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search=SEARCH)))
    out = tmp_path / "run"
    # the README's form, without --address: inside a job the search joins the job's cluster
    submit = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", address, "--no-wait",
         "--working-dir", str(REPO), "--", "ddsm-search", "search", str(config), "--supernet", str(tiny_supernet),
         "--out", str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-2000:]
    client = JobSubmissionClient(address)
    job = next(j.submission_id for j in client.list_jobs() if j.submission_id)
    deadline = time.time() + 240
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in time"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "schedules evaluated" in logs
    table = pd.read_csv(out / "evaluations.csv")
    assert len(table) >= 3 and table["schedule"].is_unique and (out / "front.csv").is_file()
    assert set(table["worker"]) <= {0, 1}
    actors = list_actors(address=address, filters=[("class_name", "=", "Evaluator")])
    assert len(actors) == 2, "the evaluations should run on the cluster's workers, not on a Ray of the job's own"
