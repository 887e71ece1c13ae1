"""Where candidate schedules are evaluated: in this process, or on Ray actors (local or a cluster).

Each Ray actor loads the supernet, its exported subnets and the reference statistics once, then
evaluates many schedules. A generation's schedules are sorted and dealt out in contiguous blocks, so
schedules that share a prefix tend to land on the same actor and reuse its latents; an actor whose
block runs dry takes the far half of the longest block left (work stealing).

Faults are handled here, not by Ray's task retries. At most `in_flight` evaluations are outstanding
per actor, so when an actor dies (its process crashed, its node was lost) the evaluations it had
are given to other actors, and every job's result is yielded exactly once. Ray restarts the actor,
which gets work again once it answers a ping; until then its queued block waits for it for a short
grace if its node is alive (a crashed process is back in seconds), and is taken over by the others
at once if its node is dead. A schedule that was being evaluated each time an actor died,
`poison_after` times in a row, is named in a DDSMError instead of killing more workers; a pool with
no actor left (none back within `wait_for_workers` seconds) ends with a one-line DDSMError, and as
the caller records each evaluation as it is yielded, `--resume` continues from there. A DDSMError
raised inside a worker reaches the caller as that DDSMError, not as Ray's remote traceback."""

from __future__ import annotations

import math
import os
import time
from collections import deque
from typing import Callable, Iterator, Sequence

from ...errors import DDSMError
from ..ray_cluster import connect_ray

Job = tuple[str, object]  # (schedule key, what it stands for: a search.genome.Candidate)


class LocalPool:
    """Evaluates in this process: `--workers 0`, for debugging and tests."""

    def __init__(self, make_evaluator: Callable[[], object]):
        self.evaluator = make_evaluator()

    def run(self, jobs: Sequence[Job], samples: int) -> Iterator[tuple[str, dict, int]]:
        """Yield (key, result, worker index) for each job scored on `samples` images, in order."""
        for key, plan in jobs:
            yield key, self.evaluator.evaluate(plan, samples), 0

    def close(self) -> None:
        """Nothing to release."""


def prefix_order(candidate) -> tuple:
    """Order schedules (search.genome.Candidate, or their steps) so that schedules sharing a solver, a
    timestep grid and a prefix are neighbours (a step without extras before the same subnet with some)."""
    if hasattr(candidate, "steps"):
        return candidate.head or "", candidate.timesteps, tuple(candidate.steps)
    return "", (), tuple(candidate)


_WAITING, _LIVE, _GONE = "waiting", "live", "gone"  # an actor's state, as this pool last heard from it
_DEAD_PINGS = 3  # pings answered "actor died" in a row before an actor counts as gone for good
_NODE_POLL = 1.0  # seconds between looks at which nodes are alive, while an actor may be restarting


class RayPool:
    """Evaluates on `workers` Ray actors; starts a local Ray unless `address` names a cluster.

    wait_for_workers: when no live actor is left, seconds to wait for actors that Ray restarts (on a
        new node, say) to answer before giving up with a DDSMError; 0 does not wait for them.
    restart_grace: seconds Ray gets to restart an actor that died on a node still alive (a crashed
        process comes back in seconds): its queued schedules wait that long for it before other actors
        take them, and a pool with no live actor waits that long for it. Not waited when its node is dead.
    in_flight: evaluations sent to each actor at a time (1 or 2); the rest stay here, free to go to
        any actor, so an actor that dies takes at most this many with it.
    poison_after: deaths of the actor evaluating one schedule, in a row, that make it a poison
        candidate: a DDSMError names it rather than letting it kill more workers.
    max_restarts: how often Ray restarts each actor (-1: without limit).
    actor_class: what runs on each actor (for tests); built as actor_class(**evaluator_args, threads=...),
        with evaluate(subnets, samples) -> dict and ping() -> its node id. The default is the Evaluator.
    actor_options: more Ray options for the actors, e.g. {"resources": {...}} to place them.
    ping_interval: seconds between pings of an actor that Ray is restarting.
    """

    def __init__(self, workers: int, evaluator_args: dict, address: str | None = None, threads: int | None = None,
                 *, wait_for_workers: float = 0.0, restart_grace: float = 30.0, in_flight: int = 1,
                 poison_after: int = 3, max_restarts: int = -1, actor_class: type | None = None,
                 actor_options: dict | None = None, ping_interval: float = 0.5):
        if workers < 1 or in_flight < 1 or poison_after < 1 or wait_for_workers < 0 or restart_grace < 0:
            raise ValueError("workers, in_flight and poison_after must be positive, wait_for_workers and "
                             "restart_grace not negative")
        import ray

        self.ray = ray
        self.started = connect_ray(address, workers)
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // workers) if not address else None
        if actor_class is None:
            from ..worker import Evaluator as actor_class
        gpus = 1 if evaluator_args.get("device") == "cuda" else 0  # one GPU per actor when sampling on CUDA
        # no task retries by Ray: a task on an actor that dies fails, and run() gives it to another actor
        options = {"num_cpus": 1, "num_gpus": gpus, "max_restarts": max_restarts, "max_task_retries": 0,
                   **(actor_options or {})}
        actor = ray.remote(**options)(actor_class)
        self.wait_for_workers, self.restart_grace = wait_for_workers, restart_grace
        self.in_flight, self.poison_after, self.ping_interval = in_flight, poison_after, ping_interval
        self.actors = [actor.remote(**evaluator_args, threads=threads) for _ in range(workers)]
        self.state = [_WAITING] * workers  # live once it answers a ping
        self.ever_live = False  # until one actor has answered, none is lost: they are still starting
        self._down_since = [time.monotonic()] * workers  # when each actor was last lost
        self._node: list[str | None] = [None] * workers  # the node each actor last answered from
        self._pings: dict = {}  # ping ref -> actor index; at most one per actor
        self._ping_due: dict[int, float] = {}  # actor index -> when to ping it again
        self._dead_pings = [0] * workers
        self._dead_nodes_seen: tuple[float, frozenset] = (-math.inf, frozenset())
        self._init_error: Exception | None = None
        self._none_since: float | None = None  # when the last live actor was lost
        for index in range(workers):
            self._ping(index)

    def run(self, jobs: Sequence[Job], samples: int) -> Iterator[tuple[str, dict, int]]:
        """Yield (key, result, worker index) as evaluations on `samples` images finish, each job once."""
        from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

        ray, n = self.ray, len(self.actors)
        order = sorted(range(len(jobs)), key=lambda job: prefix_order(jobs[job][1]))  # neighbours share prefixes
        usable = [i for i in range(n) if self.state[i] != _GONE] or list(range(n))
        queues = [deque() for _ in range(n)]  # per actor: its block of job indices, in order
        for b, index in enumerate(usable):
            queues[index].extend(order[b * len(order) // len(usable):(b + 1) * len(order) // len(usable)])
        retry: list[int] = []  # jobs whose actor died before finishing them, oldest first
        avoid: dict[int, set[int]] = {}  # job -> actors that died while holding it
        deaths: dict[int, int] = {}  # job -> deaths of the actor while it was evaluating this job
        inflight: list[list] = [[] for _ in range(n)]  # per actor: (ref, job) in submission order (first runs)
        tasks: dict = {}  # ref -> actor index
        left = len(jobs)

        def take(index: int, now: float) -> int | None:
            """Return the next job for a live actor: one a dead actor gave back, its own, or a stolen one.

            A job never goes back to an actor that died holding it while another live actor could take
            it; when none could, it comes last, once no other work is queued anywhere, so that all else
            is saved before it may kill again.
            """
            live = [i for i in range(n) if self.state[i] == _LIVE]
            for pos, job in enumerate(retry):
                if index not in avoid[job]:
                    return retry.pop(pos)
            if not queues[index]:  # steal the far end of the biggest share: both keep contiguous runs
                shares = {i: self._share(i, len(queues[i]), now) for i in range(n) if i != index and queues[i]}
                victim = max(shares, key=shares.get, default=None)
                if victim is not None and shares[victim]:
                    queues[index].extend(reversed([queues[victim].pop() for _ in range(shares[victim])]))
            if queues[index]:
                return queues[index].popleft()
            if any(queues):  # held for an actor that Ray is restarting
                return None
            for pos, job in enumerate(retry):
                if all(i in avoid[job] for i in live):
                    return retry.pop(pos)
            return None

        def fill(index: int, now: float) -> None:
            """Send live actor `index` work until it has in_flight evaluations."""
            while self.state[index] == _LIVE and len(inflight[index]) < self.in_flight:
                job = take(index, now)
                if job is None:
                    return
                ref = self.actors[index].evaluate.remote(jobs[job][1], samples)
                inflight[index].append((ref, job))
                tasks[ref] = index

        def lost(index: int) -> None:
            """Actor `index` died: its jobs go back, the one it was running is blamed, and it is pinged."""
            self.state[index], self._down_since[index] = _WAITING, time.monotonic()
            for pos, (ref, job) in enumerate(inflight[index]):
                tasks.pop(ref, None)
                avoid.setdefault(job, set()).add(index)
                if pos == 0:
                    deaths[job] = deaths.get(job, 0) + 1
                    if deaths[job] >= self.poison_after:
                        workers = ", ".join(map(str, sorted(avoid[job])))
                        raise DDSMError(f"Ray workers died {deaths[job]} times in a row while evaluating schedule "
                                        f"'{jobs[job][0]}' (workers {workers}); stopping rather than losing more "
                                        "workers (the evaluations finished so far are saved)")
                retry.append(job)
            inflight[index].clear()
            self._ping(index)

        while left:
            now = time.monotonic()
            for index in range(n):
                fill(index, now)
            deadline = self._check_workers(now)
            for index, due in list(self._ping_due.items()):
                if due <= now:
                    del self._ping_due[index]
                    self._ping(index)
            wakeups = [due - now for due in self._ping_due.values()] + ([deadline - now] if deadline is not None else [])
            if any(queues[i] and self._restarting(i, now) for i in range(n)):  # held for an actor coming back
                wakeups.append(_NODE_POLL)
            timeout = max(0.0, min(wakeups)) if wakeups else None
            waiting = [*tasks, *self._pings]
            if not waiting:
                time.sleep(timeout if timeout is not None else self.ping_interval)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
            for ref in ready:
                if ref in self._pings:
                    self._answer(ref)
                    continue
                index = tasks.pop(ref)
                job = next(j for r, j in inflight[index] if r == ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:  # the evaluation raised: a user error reads as its one line
                    if isinstance(exc.cause, DDSMError):
                        raise exc.cause.with_traceback(None) from None
                    raise
                except RayActorError:  # the actor died, or is unreachable: Ray restarts it
                    lost(index)
                    continue
                except ObjectLostError:  # the result was lost with a node: evaluate it again
                    inflight[index] = [(r, j) for r, j in inflight[index] if r != ref]
                    retry.append(job)
                    continue
                inflight[index] = [(r, j) for r, j in inflight[index] if r != ref]
                left -= 1
                fill(index, time.monotonic())  # its next evaluation runs while the caller records this one
                yield jobs[job][0], result, index

    def _ping(self, index: int) -> None:
        """Ask actor `index` whether it is up; it gets work once it answers."""
        self._pings[self.actors[index].ping.remote()] = index

    def _answer(self, ref) -> None:
        """Take a ping's answer: the actor is live, restarting (ask again later) or gone."""
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        index = self._pings.pop(ref)
        try:
            node = self.ray.get(ref)
        except ActorDiedError as exc:
            if exc.actor_init_failed:  # its __init__ raised: Ray does not restart it
                cause = exc.args[0].cause if exc.args and isinstance(exc.args[0], RayTaskError) else None
                if isinstance(cause, DDSMError):  # a user error: the same on every worker
                    raise cause.with_traceback(None) from None
                self._init_error = exc
                self.state[index] = _GONE
                return
            self._dead_pings[index] += 1  # killed for good, or caught between death and restart
            if self._dead_pings[index] >= _DEAD_PINGS:
                self.state[index] = _GONE
            else:
                self._ping_due[index] = time.monotonic() + self.ping_interval
            return
        except RayActorError:  # unavailable: restarting, or waiting for a node to run on
            self._dead_pings[index] = 0
            self._ping_due[index] = time.monotonic() + self.ping_interval
            return
        self._dead_pings[index] = 0
        self._node[index] = node if isinstance(node, str) else None
        self.state[index] = _LIVE
        self.ever_live = True

    def _share(self, index: int, queued: int, now: float) -> int:
        """Return how many of actor `index`'s queued jobs an idle actor may take.

        A live owner keeps the near half, rounded up (its next job stays its own: an actor that is
        dying but not yet known dead keeps it for when Ray has restarted it); an actor that Ray is
        restarting on a live node keeps all for restart_grace; one lost with its node, or still
        starting, gives all.
        """
        if self.state[index] == _LIVE:
            return queued // 2
        return 0 if self._restarting(index, now) else queued

    def _restarting(self, index: int, now: float) -> bool:
        """Return True if actor `index` died on a node that is still alive less than restart_grace ago:
        Ray is likely to have it back soon. Not for an actor that has never answered (where it is being
        built, if anywhere, is unknown: others may take its work, and it takes some back when it is up).
        """
        if self.state[index] != _WAITING or self._node[index] is None:
            return False
        if now - self._down_since[index] >= self.restart_grace:
            return False
        return self._node[index] not in self._dead_nodes(now)

    def _dead_nodes(self, now: float) -> frozenset:
        """Return the ids of the nodes Ray knows are dead (asked at most once per _NODE_POLL seconds)."""
        when, dead = self._dead_nodes_seen
        if now - when >= _NODE_POLL:
            try:
                dead = frozenset(node["NodeID"] for node in self.ray.nodes() if not node["Alive"])
            except Exception:  # a Ray that cannot say: restart_grace alone decides
                dead = frozenset()
            self._dead_nodes_seen = (now, dead)
        return dead

    def _check_workers(self, now: float) -> float | None:
        """Raise if no actor is left to evaluate on; return when to give up waiting for one, if waiting."""
        if _LIVE not in self.state and self._pings:  # an answer already in may say otherwise
            for ref in self.ray.wait(list(self._pings), num_returns=len(self._pings), timeout=0)[0]:
                self._answer(ref)
        if _LIVE in self.state:
            self._none_since = None
            return None
        if all(state == _GONE for state in self.state):
            if self._init_error is not None:  # they failed to start: the reason, as it came
                raise self._init_error
            raise self._lost_all()
        if not self.ever_live:  # still starting (or waiting for the cluster to place them)
            return None
        if self._none_since is None:
            self._none_since = now
        # a crashed actor on a live node is back in seconds: worth the wait even when told not to wait
        restarting = [self._down_since[i] + self.restart_grace for i in range(len(self.actors))
                      if self._restarting(i, now)]
        deadline = max([self._none_since + self.wait_for_workers, *restarting])
        if now >= deadline:
            raise self._lost_all()
        return min(deadline, now + _NODE_POLL) if restarting else deadline

    def _lost_all(self) -> DDSMError:
        waited = f" within {self.wait_for_workers:g} s" if self.wait_for_workers else ""
        return DDSMError(f"all {len(self.actors)} Ray workers were lost and none came back{waited}; "
                         "--resume continues from the evaluations saved so far")

    def close(self) -> None:
        """Stop the actors, and Ray if this pool started it."""
        for a in self.actors:
            self.ray.kill(a)
        self._pings.clear()
        if self.started:
            self.ray.shutdown()


class PoolExecutor:
    """Runs the generations on a pool (LocalPool or RayPool), one batch of evaluations at a time."""

    def __init__(self, loop, algorithm, pool):  # loop: search.loop.Loop
        self.loop, self.algorithm, self.pool = loop, algorithm, pool

    def run(self) -> None:
        """Run every generation (or until the space is exhausted)."""
        for gen in range(1, self.loop.q.generations + 1):  # numbered from 1, as in the run's files
            generation = self.loop.start(gen, self.algorithm)
            if generation is None:
                self.loop.exhausted(gen)
                return
            while (batch := generation.next_batch()) is not None:
                jobs, samples = batch
                for key, result, worker in self.pool.run(jobs, samples):
                    generation.add(key, result, worker)
            self.loop.finish(generation)

    def close(self) -> None:
        """Stop the pool."""
        self.pool.close()
