"""Ray faults on a real two-node cluster (Ray's own `Cluster` harness): a lost node, a poison
schedule, every worker lost, and a user error raised inside a worker.

One cluster serves the module: a head node and a worker node with one CPU each, so the search's
two evaluator actors (one CPU each) land one per node. Stand-in actors need no CPU: they are placed
by the custom resource "spare", which only the worker node has, so that removing it loses them all.
"""

from __future__ import annotations

import csv
import os
import sys
import threading
import time

import pandas as pd
import pytest

from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.search.pareto import front_of
from ddsm_search.space.subnet import Subnet, schedule_key
from tests.conftest import tiny_dict

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from ddsm_search.search.executors.pool import RayPool  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stand-in travels to the workers by value

# a dead node is declared dead within about half a second (the default takes 15 s after a hard kill)
FAST_HEALTH_CHECK = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                     "health_check_timeout_ms": 200, "health_check_failure_threshold": 3}
# 300 images an evaluation: slow enough (about 0.2 s) that both actors are up long before the search ends,
# so the node is lost mid-search even when one actor starts seconds after the other
SEARCH = {"steps": 6, "segments": 3, "population": 8, "generations": 3, "samples": 300, "batch_size": 300}
ON_WORKER_NODE = {"num_cpus": 0, "resources": {"spare": 1}}  # stand-ins: only the worker node can host them


class StandIn:
    """A stand-in evaluator: scores a schedule by a formula, after `delay` seconds, and misbehaves on cue."""

    def __init__(self, delay: float = 0.0, slow: float = 0.0, poison: tuple = (), fail: str | None = None,
                 bug: str | None = None, init_error: str | None = None, threads: int | None = None):
        if init_error:
            raise DDSMError(init_error)
        self.delay, self.slow, self.poison, self.fail, self.bug = delay, slow, set(poison), fail, bug

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def evaluate(self, subnets: list[Subnet], samples: int) -> dict:
        key = _key(subnets)
        if key in self.poison:
            os._exit(1)  # as an evaluation that crashes the process (out of memory, a segfault) would
        if self.fail:
            raise DDSMError(self.fail)
        if self.bug:
            raise ValueError(self.bug)
        time.sleep(self.slow if subnets[0]["width"] == 0.5 else self.delay)
        return {"fid": _widths(subnets) * samples, "pid": os.getpid()}


def _key(subnets) -> str:
    return schedule_key(subnets)


def _widths(subnets) -> float:
    return sum(s["width"] for s in subnets)


def _jobs(count: int = 8) -> list:
    """`count` distinct schedules (one subnet per step); sorted, the first half starts with width 0.5."""
    grid = [[Subnet.of(width=w) for w in (a, b, c)]
            for a in (0.5, 1.0) for b in (0.5, 0.75, 1.0) for c in (0.5, 0.75, 1.0)]
    picked = grid[:count // 2] + grid[-(count - count // 2):]
    return [(_key(s), s) for s in reversed(picked)]  # handed over unsorted: the pool sorts


def _pool(cluster, workers: int = 2, **kw) -> RayPool:
    evaluator_args = kw.pop("args", {})
    return RayPool(workers, evaluator_args, address=cluster.address, actor_class=StandIn,
                   actor_options=kw.pop("actor_options", ON_WORKER_NODE), **kw)


def _warm(pool: RayPool) -> None:
    """Return once every actor of `pool` has evaluated something (actors start one after another)."""
    deadline = time.monotonic() + 60
    while set(pool.state) != {"live"} and time.monotonic() < deadline:
        list(pool.run(_jobs(2), 1))
        time.sleep(0.05)
    assert set(pool.state) == {"live"}


@pytest.fixture(scope="module")
def cluster():
    """A head node and one worker node; tests that remove the worker node get a new one (fixture `node`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "_system_config": FAST_HEALTH_CHECK})
        try:
            c.add_node(num_cpus=1, resources={"spare": 2})
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


@pytest.fixture
def node(cluster):
    """The cluster's worker node, added again if an earlier test removed it."""
    if not cluster.worker_nodes:
        cluster.add_node(num_cpus=1, resources={"spare": 2})
    yield next(iter(cluster.worker_nodes))
    assert not ray.is_initialized(), "every pool disconnects when closed"


def test_worker_ddsm_error_reaches_the_caller_as_its_one_line(cluster, node):
    message = "width 0.3 is not in the supernet (width choices: 1.0, 0.75, 0.5)"
    pool = _pool(cluster, args={"fail": message})
    try:
        with pytest.raises(DDSMError) as info:
            list(pool.run(_jobs(4), 10))
    finally:
        pool.close()
    assert type(info.value) is DDSMError and str(info.value) == message  # not Ray's 15-line remote traceback
    pool = _pool(cluster, workers=1, args={"bug": "a bug"})
    try:  # any other exception comes as Ray raises it: its remote traceback is what a bug report needs
        with pytest.raises(ValueError, match="a bug") as info:
            list(pool.run(_jobs(2), 10))
        assert isinstance(info.value, ray.exceptions.RayTaskError)
    finally:
        pool.close()
    pool = _pool(cluster, workers=1, args={"init_error": message})
    try:  # raised while the actor loads: the same one line
        with pytest.raises(DDSMError) as info:
            list(pool.run(_jobs(2), 10))
    finally:
        pool.close()
    assert type(info.value) is DDSMError and str(info.value) == message


def test_idle_worker_steals_the_far_end_of_a_slow_block(cluster, node):
    jobs = _jobs(8)
    pool = _pool(cluster, args={"slow": 0.4, "delay": 0.01})
    try:
        _warm(pool)  # both actors up before the clock starts: the fast block's owner is idle first
        got = list(pool.run(jobs, 10))
    finally:
        pool.close()
    ordered = sorted(subnets for _, subnets in jobs)
    assert all(s[0]["width"] == 0.5 for s in ordered[:4]) and all(s[0]["width"] == 1.0 for s in ordered[4:])
    assert sorted(key for key, _, _ in got) == sorted(key for key, _ in jobs), "each job once"
    assert all(result["fid"] == _widths(dict(jobs)[key]) * 10 for key, result, _ in got)
    slow_block = [_key(w) for w in ordered[:4]]  # dealt to one actor: the schedules that start with 0.5
    by = {key: worker for key, _, worker in got}
    owner = by[slow_block[0]]
    stolen = [key for key in slow_block if by[key] != owner]
    assert stolen and stolen == slow_block[-len(stolen):], "the idle actor takes the far end, in one run"
    assert len(stolen) < len(slow_block), "the owner keeps the near half"


def test_poison_schedule_is_named_instead_of_killing_every_worker(cluster, node):
    jobs = _jobs(6)
    poison = sorted(subnets for _, subnets in jobs)[1]
    pool = _pool(cluster, args={"poison": (_key(poison),), "delay": 0.05})
    got = []
    started = time.monotonic()
    try:
        with pytest.raises(DDSMError) as info:
            for key, _, _ in pool.run(jobs, 10):
                got.append(key)
    finally:
        pool.close()
    message = str(info.value)
    assert "\n" not in message and f"3 times in a row while evaluating schedule '{_key(poison)}'" in message, message
    assert len(got) == len(set(got)) == len(jobs) - 1, "everything else was evaluated, once"
    assert all(n["Alive"] for n in ray_nodes(cluster)), "the cluster itself is untouched"
    assert time.monotonic() - started < 60


def test_losing_every_worker_ends_with_one_line_naming_resume(cluster, node):
    jobs = _jobs(8)
    pool = _pool(cluster, args={"delay": 0.3})  # both actors on the worker node
    got, started = [], None
    try:
        with pytest.raises(DDSMError) as info:
            for key, _, _ in pool.run(jobs, 10):
                got.append(key)
                if len(got) == 1:
                    cluster.remove_node(node)
                    started = time.monotonic()
    finally:
        pool.close()
    message = str(info.value)
    assert "\n" not in message and "all 2 Ray workers were lost" in message and "--resume" in message, message
    assert 1 <= len(got) == len(set(got)) < len(jobs)
    assert time.monotonic() - started < 10, "a dead node is not waited for when wait_for_workers is 0"


def test_lost_node_is_waited_for_when_asked_and_nothing_is_lost_or_repeated(cluster, node):
    jobs = _jobs(8)
    pool = _pool(cluster, args={"delay": 0.3}, wait_for_workers=60, in_flight=2)
    got = []
    try:
        for key, result, _ in pool.run(jobs, 10):
            got.append((key, result["pid"]))
            if len(got) == 1:  # the node goes and a new one joins: Ray restarts both actors there
                cluster.remove_node(node)
                cluster.add_node(num_cpus=1, resources={"spare": 2})
    finally:
        pool.close()
    keys = [key for key, _ in got]
    assert sorted(keys) == sorted(key for key, _ in jobs), "every job's result exactly once"
    # at most five results can come from the first actors (two each in flight, one done before the loss)
    assert got[0][1] not in {pid for _, pid in got[5:]}, "the rest was evaluated by the restarted actors"


def test_search_survives_losing_a_node_mid_generation(cluster, node, tiny_supernet, tmp_path):
    from ddsm_search.search.runner import run_search

    cfg = config_from_dict(tiny_dict(search=SEARCH))
    out, cache = tmp_path / "cluster", str(tmp_path / "cache")
    removed: dict = {}
    finished = threading.Event()

    def remove_once_both_evaluated():  # the worker node goes as soon as both actors have rows on disk
        table = out / "evaluations.csv"
        while not finished.is_set():
            rows = list(csv.DictReader(table.read_text().splitlines())) if table.is_file() else []
            if {row.get("worker") for row in rows} >= {"0", "1"}:
                cluster.remove_node(node, allow_graceful=False)  # as a crash: its processes are killed
                removed["rows"] = len(rows)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=remove_once_both_evaluated)
    watcher.start()
    try:
        files = run_search(cfg, tiny_supernet, out, address=cluster.address, workers=2, progress=False,
                           cache_dir=cache)
    finally:
        finished.set()
        watcher.join()
    local = run_search(cfg, tiny_supernet, tmp_path / "local", workers=0, progress=False, cache_dir=cache)
    table = files.table()
    assert "rows" in removed and removed["rows"] < len(table), "the node must go while the search runs"
    assert table["schedule"].is_unique, "no evaluation repeated"
    assert set(table["schedule"]) == set(local.rows), "every asked schedule evaluated"
    f_cluster, f_local = front_of(table, "fid", SEARCH["samples"]), front_of(local.table(), "fid", SEARCH["samples"])
    assert f_cluster["schedule"].tolist() == f_local["schedule"].tolist()
    pd.testing.assert_series_equal(f_cluster["fid"].reset_index(drop=True), f_local["fid"].reset_index(drop=True),
                                   rtol=1e-9)


def ray_nodes(cluster) -> list[dict]:
    """The cluster's nodes as Ray lists them, asked from a connection of our own."""
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        return [n for n in ray.nodes() if n["NodeID"] in {x.node_id for x in cluster.list_all_nodes()}]
    finally:
        ray.shutdown()
