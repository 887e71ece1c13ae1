"""One worker's evaluation state: the supernet, its plan runtime (static subnets made once), the feature
extractor, the reference statistics and the prefix caches, loaded once and reused for every candidate."""

from __future__ import annotations

import os

from ..backends import backend_of
from ..checkpoint import load_supernet
from ..config import SearchConfig
from ..evaluation.full_samples import full_size_samples
from ..evaluation.quality import evaluate
from ..evaluation.scoring import FullReference, make_scorer
from ..sampling import PrefixCache, Runtime
from ..space.steps import Step
from ..solvers.base import Solver
from .genome import SearchSpace, segment_bounds

SEARCH_SEEDS = "search"  # the search only ever sees this seed set; winners are re-checked on "heldout"
# Fault injection for tests: if this names a file that does not exist yet, the first evaluation to
# see that creates it and kills its own worker process, as a crash or a lost node would.
FAULT_ENV = "DDSM_SEARCH_KILL_WORKER_ONCE"


def _runtime(supernet, q: SearchConfig, device: str, backend) -> tuple[Runtime, SearchSpace, object]:
    """Return the runtime of a search's worker, with every subnet the space can run made, the space,
    and the reference plan (full size under the search's sampler over its steps: drift's reference)."""
    space = SearchSpace.for_supernet(supernet, q)
    runtime = Runtime(supernet, device=device, backend=backend, batch_size=min(q.samples, q.batch_size))
    runtime.prepare(Step(s) for s in space.subnets())
    reference = runtime.plan([supernet.model.full] * q.steps, solver=Solver.of_sampler(q.sampler, q.eta))
    return runtime, space, reference


def boundaries(space: SearchSpace):
    """Return where a prefix cache keeps latents, for any number of steps: the segments' starts."""
    return lambda n: {start for start, _ in segment_bounds(n, space.segments)[1:]}


def prepare_reference(supernet_dir: str, search: dict, device: str = "cpu", cache_dir: str | None = None) -> dict:
    """Choose each subnet's backend, and compute (or find on disk) the reference statistics and the
    full-size samples, once, before the workers start, so that they all use the same ones; fail here,
    before anything is written, if the run's metric cannot be measured (a missing Inception file) or a
    family's runtime cannot be made (an early exit without heads). Return the choice, {subnet key:
    backend}, for the workers."""
    q = SearchConfig(**search)
    supernet = load_supernet(supernet_dir, device)
    runtime, space, reference = _runtime(supernet, q, device, q.backend)
    runtime.prepare(step for g in space.uniform() for step in space.plan(g))  # families' callables: fail now
    for g in space.baselines()[:1]:  # each solver builds (diffusers importable) before anything is written
        for solver in space.solvers:
            runtime.plan(space.plan(g), solver=solver, timesteps=space.candidate(g).timesteps).run()
    make_scorer(supernet, metric=q.metric, drift_space=q.drift_space, device=device, cache_dir=cache_dir)
    for n in {q.samples, q.screen_samples} - {None}:
        full_size_samples(reference, n=n, seed_set=SEARCH_SEEDS, batch_size=q.batch_size, cache_dir=cache_dir)
    return {s.subnet.key: backend_of(d) for s, d in runtime.denoisers.items() if not s.fields}


class Evaluator:
    """Scores schedules (FID, KID, drift) on the search seed set, reusing latents of shared prefixes."""

    def __init__(self, supernet_dir: str, search: dict, device: str = "cpu", cache_dir: str | None = None,
                 threads: int | None = None, backends: dict | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.search = q = SearchConfig(**search)
        self.supernet = load_supernet(supernet_dir, device).with_cost(q.cost)  # the run's FLOPs
        # the driver's choice of backends (prepare_reference), so every worker runs each subnet alike
        self.runtime, space, self.reference = _runtime(self.supernet, q, device,
                                                       backends if backends is not None else q.backend)
        self.scorer = make_scorer(self.supernet, metric=q.metric, drift_space=q.drift_space, device=device,
                                  cache_dir=cache_dir)
        self.cache_dir = cache_dir
        self.full: dict[int, FullReference] = {}  # per sample count: the full-size images drift is measured from
        # cached latents belong to one sample count: one cache for full evaluations, one for screens
        self.boundaries = boundaries(space)
        self.caches = {n: PrefixCache(self.boundaries) for n in {q.samples, q.screen_samples} if n}

    def ping(self) -> str:
        """Answer that this Ray actor is up, with its node's id (the pool gives work only to actors that answer)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def evaluate(self, candidate, samples: int | None = None) -> dict:
        """Return fid, kid, samples, seed_set, seconds, the denoising steps run and saved and, for a
        dynamic schedule, the executed GFLOPs per image (mean and spread) of a schedule
        (search.genome.Candidate: its steps, solver and timesteps)."""
        marker = os.environ.get(FAULT_ENV)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        q = self.search
        n = samples or q.samples
        if n not in self.caches:
            self.caches[n] = PrefixCache(self.boundaries)
        cache = self.caches[n]
        plan = self.runtime.plan(list(candidate.steps), solver=candidate.solver, timesteps=candidate.timesteps)
        if n not in self.full:  # made once (or read from beside the supernet); its latents seed the prefix cache
            self.full[n] = FullReference(full_size_samples(self.reference, n=n, seed_set=SEARCH_SEEDS,
                                                           batch_size=q.batch_size, cache=cache,
                                                           cache_dir=self.cache_dir))
        run_before, saved_before = cache.steps_run, cache.steps_saved
        result = evaluate(plan, self.scorer, n=n, seed_set=SEARCH_SEEDS, batch_size=q.batch_size, cache=cache,
                          full=self.full[n])
        spread = result["executed"]["flops_per_image"]["sd"] / 1e9 if result["executed"] else 0.0
        return {"gflops": result["gflops_per_image"], "gflops_sd": spread, "fid": result["fid"], "kid": result["kid"],
                "drift": result["drift"], "samples": result["n"], "seed_set": SEARCH_SEEDS,
                "seconds": round(result["seconds"] + result["eval_seconds"], 3),
                "steps_run": cache.steps_run - run_before, "steps_saved": cache.steps_saved - saved_before}
