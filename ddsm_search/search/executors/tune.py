"""The schedule search as a Ray Tune experiment (`search.executor: tune`).

Tune knows one metric and one mode; our algorithms are two-objective and generational. So the
Searcher carries both objectives itself: it hands out the new schedules of the current generation
(its `loop.Generation` batches, the same the actor pool runs), records each trial's result as a row of
the run table as it lands, and on the last result of a generation tells the ask/tell algorithm and
asks the next one; once every generation is done it answers Searcher.FINISHED. The run's files are
the pool's, written by the same code (search/loop.py), so `report` and `export` read a Tune run as any.

Each trial evaluates one schedule on a reused Tune actor that keeps its Evaluator (supernet, subnets,
reference, prefix cache) between trials. Tune's experiment lies in RUN/tune, with Tune's loggers
(CSV, JSON and TensorBoard by default; MLflow and W&B callbacks on request). `--resume` uses
Tuner.restore on it; as with the pool, the run table is the record of what is done: the restored
searcher replays the seeded algorithm from generation 1 against it, and trials that were running when
the search stopped are not resumed but handed out again (Tune marks them terminated).
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import shutil
from collections import deque
from typing import Sequence

from ray.tune.search import Searcher

from ...errors import DDSMError
from ..ray_cluster import connect_ray
from .pool import prefix_order

# --tune-logger NAME: (module, callback class, the package it needs, the keyword naming the run there)
LOGGERS = {"mlflow": ("ray.air.integrations.mlflow", "MLflowLoggerCallback", "mlflow", "experiment_name"),
           "wandb": ("ray.air.integrations.wandb", "WandbLoggerCallback", "wandb", "project")}
EXPERIMENT = "tune"  # Tune's experiment directory, inside the run directory
RESULT_KEYS = ("gflops", "gflops_sd", "fid", "kid", "drift", "samples", "seed_set", "seconds", "steps_run",
               "steps_saved")
RETRIES = 2  # Tune restarts a trial whose actor died this many times before the search gives up on it


def check_tune(q, address: str | None, loggers: Sequence[str]) -> None:
    """Raise DDSMError, before anything is written, if a Tune search cannot run with these settings."""
    if address and address.startswith("ray://"):
        raise DDSMError(f"--address {address}: the tune executor runs Tune's controller in this process, which Ray "
                        "client (ray://) would move onto the cluster; submit the search with `ray job submit` instead")
    for name in loggers:
        if name not in LOGGERS:
            raise DDSMError(f"--tune-logger {name}: expected one of {', '.join(LOGGERS)}")
        package = LOGGERS[name][2]
        try:
            __import__(package)
        except ImportError:
            raise DDSMError(f"--tune-logger {name}: the {package} package is not installed (pip install "
                            f"{package})") from None


def _trial_dirname(trial) -> str:
    """Name a trial's directory by its id alone: the default name carries the schedule key's characters."""
    return f"trial_{trial.trial_id}"


_EVALUATORS: dict = {}  # per Tune actor process: the Evaluator (and space) of the run it serves, kept between trials


def _evaluator(evaluator_args: dict, threads: int | None):
    """Return this actor's (Evaluator, SearchSpace) of the run, made on its first trial."""
    from ..genome import SearchSpace
    from ..worker import Evaluator

    token = repr(sorted(evaluator_args.items()))
    if token not in _EVALUATORS:
        _EVALUATORS.clear()
        evaluator = Evaluator(**evaluator_args, threads=threads)
        _EVALUATORS[token] = evaluator, SearchSpace.for_supernet(evaluator.supernet, evaluator.search)
    return _EVALUATORS[token]


def _fault(exc: BaseException) -> str:
    """Return what went wrong in one line, and keep the traceback in the trial's directory."""
    import traceback

    from ray import tune

    what = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    try:
        path = os.path.join(tune.get_context().get_trial_dir(), "fault.txt")
        with open(path, "w") as fh:
            fh.write("".join(traceback.format_exception(exc)))
        return f"{what} (traceback in {path})"
    except Exception:  # noqa: BLE001 - the message matters more than where its traceback is kept
        return what


def evaluate_trial(config: dict, evaluator_args: dict, threads: int | None) -> None:
    """Tune's trainable: evaluate one schedule (config: schedule, genome, samples) and report its result.

    An exception is reported, not raised: a user error (DDSMError) as its one line (`ddsm_error`), any
    other as its type and first line (`ddsm_fault`), so that the search stops with that line rather
    than Tune retrying a trial that fails the same way every time and printing Ray's tracebacks. Only
    a worker that dies (its process lost) fails the trial, which Tune then restarts.
    """
    import ray
    from ray import tune

    metric = evaluator_args["search"]["metric"]
    try:
        evaluator, space = _evaluator(evaluator_args, threads)
        candidate = space.candidate(tuple(config["genome"]))
        if candidate.key != config["schedule"]:
            raise DDSMError(f"trial config: genome {config['genome']} is not schedule {config['schedule']}")
        result = evaluator.evaluate(candidate, config["samples"])
    except DDSMError as exc:  # a user error: the same on every worker, so the search stops with its one line
        tune.report({"ddsm_error": str(exc), metric: math.nan})
        return
    except Exception as exc:  # noqa: BLE001 - a fault: named in one line, its traceback kept in the trial dir
        tune.report({"ddsm_fault": _fault(exc), metric: math.nan})
        return
    tune.report({**result, "worker": ray.get_runtime_context().get_actor_id()})


def _failure(key: str, result: dict | None) -> str:
    """Return the one line that ends a search whose trial of schedule `key` failed (`result`: what it
    reported, None if it never reported: its worker died each time Tune ran it)."""
    if result and "ddsm_error" in result:  # the user's error, as the worker raised it
        return result["ddsm_error"]
    saved = "the evaluations finished so far are saved: --resume continues"
    if result and "ddsm_fault" in result:
        return f"evaluating schedule '{key}' failed on a Tune worker: {result['ddsm_fault']}; {saved}"
    return f"the Tune trial evaluating schedule '{key}' failed {RETRIES + 1} times (its worker died each time); {saved}"


_LIVE: dict[str, "ScheduleSearcher"] = {}  # run directory -> the searcher of the search running it in this process


def _attach(token: str) -> "ScheduleSearcher":
    """Return the live searcher of a run: what Tune's pickled experiment (tuner.pkl) unpickles to (the only
    live one, if the run directory has moved since)."""
    if token not in _LIVE and len(_LIVE) == 1:
        return next(iter(_LIVE.values()))
    if token not in _LIVE:
        raise DDSMError(f"the Tune experiment of {token} is restored by `ddsm-search search ... --executor tune "
                        "--resume`, not by Tuner.restore alone")
    return _LIVE[token]


class ScheduleSearcher(Searcher):
    """A Tune Searcher over schedules: one generation of the ask/tell algorithm at a time (see module doc).

    It pickles (into Tune's experiment state) as a reference to the run: its state is the run table,
    which a restored search replays, not the pickle.
    """

    def __init__(self, loop, algorithm, max_concurrent: int):
        super().__init__(metric=loop.q.metric, mode="min")
        self.loop, self.algorithm, self.max_concurrent = loop, algorithm, max_concurrent
        self.token = str(loop.files.dir.resolve())
        self.gen, self.generation = 1, None  # generations are numbered from 1, as in the run's files
        self.queue: deque = deque()  # (key, plan) of the current batch not yet handed out
        self.waiting: set[str] = set()  # keys of the current batch whose result is not in yet
        self.samples = 0
        self.live: dict[str, str] = {}  # trial id -> schedule key, for trials of this session
        self.workers: dict[str, int] = {}  # Tune actor id -> worker index in the table
        self.done = self.exhausted = False
        self.error: str | None = None
        _LIVE[self.token] = self

    def __reduce__(self):
        return _attach, (self.token,)

    def release(self) -> None:
        """Forget this searcher (the search is over)."""
        if _LIVE.get(self.token) is self:
            del _LIVE[self.token]

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Accept Tune's properties: the search space is ours, the metric shown is the run's."""
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Limit concurrent trials here (a ConcurrencyLimiter's own count would not survive a restore)."""
        self.max_concurrent = max_concurrent
        return True

    def _advance(self) -> None:
        """While nothing of the current batch is left to hand out or wait for: the next batch, or tell and
        record the generation and ask the next one, until there is work or the search is done."""
        while not self.done and not self.queue and not self.waiting and self.error is None:
            batch = self.generation.next_batch() if self.generation is not None else None
            if batch is not None:
                jobs, self.samples = batch
                self.queue = deque(sorted(jobs, key=lambda job: prefix_order(job[1])))  # neighbours share prefixes
                self.waiting = {key for key, _ in jobs}
                return
            if self.generation is not None:
                self.loop.finish(self.generation)
                self.generation, self.gen = None, self.gen + 1
            if self.gen > self.loop.q.generations:
                self.done = True
                return
            self.generation = self.loop.start(self.gen, self.algorithm)
            if self.generation is None:
                self.loop.exhausted(self.gen)
                self.done = self.exhausted = True

    def suggest(self, trial_id: str):
        """Return the next schedule of the current batch as a trial config, None to wait, or FINISHED."""
        if self.error is None:
            self._advance()
        if self.done or self.error is not None:
            return Searcher.FINISHED
        if not self.queue or len(self.live) >= self.max_concurrent:
            return None
        key, _ = self.queue.popleft()
        self.live[trial_id] = key
        return {"schedule": key, "genome": list(self.generation.todo[key][1]), "samples": self.samples}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Record a trial's evaluation; after the last of a batch, move on (tell, record, ask)."""
        key = self.live.pop(trial_id, None)
        if key is None:  # a trial of an earlier session (restored): its schedule is handed out again
            return
        if error or not result or "ddsm_error" in result or "ddsm_fault" in result:
            if self.error is None:
                self.error = _failure(key, result if not error else None)
            return
        worker = self.workers.setdefault(result.get("worker"), len(self.workers))
        self.generation.add(key, {k: result[k] for k in RESULT_KEYS if k in result}, worker)
        self.waiting.discard(key)
        if self.error is None:
            self._advance()

    def save(self, checkpoint_path: str) -> None:
        """Write where the search stands (for a reader; restoring replays the run table instead)."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"run": self.token, "generation": self.gen, "done": self.done}, f)

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to load: the run table is the state, replayed from generation 1."""


class TuneExecutor:
    """Runs a search's generations as one Tune experiment in RUN/tune (restored with --resume)."""

    def __init__(self, loop, algorithm, evaluator_args: dict, address: str | None, *, resume: bool = False,
                 loggers: Sequence[str] = ()):
        q = loop.q
        self.started = connect_ray(address, q.workers)
        import ray
        from ray import tune

        self.ray, self.loop = ray, loop
        self.searcher = ScheduleSearcher(loop, algorithm, q.workers)
        threads = None if address else max(1, (os.cpu_count() or 1) // q.workers)
        resources = {"cpu": 1, "gpu": 1 if evaluator_args.get("device") == "cuda" else 0}
        trainable = tune.with_resources(tune.with_parameters(evaluate_trial, evaluator_args=evaluator_args,
                                                             threads=threads), resources)
        self.path = loop.files.dir.resolve() / EXPERIMENT
        self.restored = resume and tune.Tuner.can_restore(str(self.path))
        if self.restored:
            # unfinished trials are not resumed: the run table says what is done, the searcher hands out the rest
            self.tuner = tune.Tuner.restore(str(self.path), trainable, resume_unfinished=False, resume_errored=False)
            return
        if self.path.exists():  # an experiment killed before Tune saved its state: nothing to restore
            shutil.rmtree(self.path)
        callbacks = []  # Tune's own CSV, JSON and TensorBoard loggers come without asking
        for name in loggers:
            module, cls, _, naming = LOGGERS[name]
            callbacks.append(getattr(importlib.import_module(module), cls)(**{naming: loop.files.dir.name}))
        self.tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=self.searcher, num_samples=-1, max_concurrent_trials=q.workers,
                                        reuse_actors=True, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(self.path.parent), callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=RETRIES),
                                      verbose=0))  # Tune's per-trial tables would drown the generation lines

    def run(self) -> None:
        """Fit the experiment; raise the search's error, or KeyboardInterrupt if Tune was interrupted."""
        self.tuner.fit()
        if self.searcher.error is not None:
            raise DDSMError(self.searcher.error)
        if not self.searcher.done:  # Tune stopped early: SIGINT (its state is saved for --resume)
            raise KeyboardInterrupt

    def close(self) -> None:
        """Forget the searcher, and stop Ray if this search started it."""
        self.searcher.release()
        if self.started:
            self.ray.shutdown()
