"""One worker's evaluation state: the supernet, its static subnets, the feature extractor, the
reference statistics and the prefix cache, loaded once and reused for every candidate schedule."""

from __future__ import annotations

import os

from ..checkpoint import load_supernet
from ..config import SearchConfig
from ..evaluation.quality import evaluate
from ..evaluation.full_samples import full_size_samples
from ..metrics import seed_for
from ..sampling import PrefixCache, make_denoisers
from ..evaluation.scoring import FullReference, make_scorer
from .genome import SearchSpace

SEARCH_SEEDS = "search"  # the search only ever sees this seed set; winners are re-checked on "heldout"
# Fault injection for tests: if this names a file that does not exist yet, the first evaluation to
# see that creates it and kills its own worker process, as a crash or a lost node would.
FAULT_ENV = "DDSM_SEARCH_KILL_WORKER_ONCE"


def prepare_reference(supernet_dir: str, search: dict, device: str = "cpu", cache_dir: str | None = None) -> dict:
    """Choose each subnet's backend, and compute (or find on disk) the reference statistics and the
    full-size samples, once, before the workers start, so that they all use the same ones; fail here,
    before anything is written, if the run's metric cannot be measured (a missing Inception file).
    Return the choice, {subnet key: backend}, for the workers."""
    from ..backends import backend_of

    q = SearchConfig(**search)
    supernet = load_supernet(supernet_dir, device)
    model = supernet.model
    space = SearchSpace.for_supernet(supernet, q)
    if space.thresholds:  # fail now, before anything is written, if the supernet has no exit heads
        from ..methods.early_exit.finetune import load_exit_heads

        load_exit_heads(supernet, device)
    denoisers = make_denoisers(model, [model.full, *space.subnets()], device, q.backend, min(q.samples, q.batch_size))
    make_scorer(supernet, metric=q.metric, drift_space=q.drift_space, device=device, cache_dir=cache_dir)
    for n in {q.samples, q.screen_samples} - {None}:
        full_size_samples(supernet, n=n, seed_set=SEARCH_SEEDS, seed=seed_for(SEARCH_SEEDS), sampler=q.sampler,
                          eta=q.eta, steps=q.steps, batch_size=q.batch_size, device=device, denoisers=denoisers,
                          cache_dir=cache_dir)
    return {s.key: backend_of(d) for s, d in denoisers.items()}


class Evaluator:
    """Scores schedules (FID, KID, drift) on the search seed set, reusing latents of shared prefixes."""

    def __init__(self, supernet_dir: str, search: dict, device: str = "cpu", cache_dir: str | None = None,
                 threads: int | None = None, backends: dict | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.search = SearchConfig(**search)
        self.device = device
        self.supernet = load_supernet(supernet_dir, device).with_cost(self.search.cost)  # the run's FLOPs
        model = self.supernet.model
        q = self.search
        space = SearchSpace.for_supernet(self.supernet, q)
        self.heads = None
        if space.thresholds:
            from ..methods.early_exit.finetune import load_exit_heads

            self.heads = load_exit_heads(self.supernet, device)
        # the driver's choice of backends (prepare_reference), so every worker runs each subnet alike
        self.denoisers = make_denoisers(model, [model.full, *space.subnets()], device,
                                        backends if backends is not None else q.backend, min(q.samples, q.batch_size))
        self.scorer = make_scorer(self.supernet, metric=self.search.metric, drift_space=self.search.drift_space,
                                  device=device, cache_dir=cache_dir)
        self.cache_dir = cache_dir
        self.full: dict[int, FullReference] = {}  # per sample count: the full-size images drift is measured from
        boundaries = [start for start, _ in space.bounds[1:]]
        # cached latents belong to one sample count: one cache for full evaluations, one for screens
        self.caches = {n: PrefixCache(boundaries) for n in {self.search.samples, self.search.screen_samples} if n}

    def ping(self) -> str:
        """Answer that this Ray actor is up, with its node's id (the pool gives work only to actors that answer)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def evaluate(self, plan, samples: int | None = None) -> dict:
        """Return fid, kid, samples, seed_set, seconds, the denoising steps run and saved and, for a
        dynamic schedule, the executed GFLOPs per image (mean and spread) of a plan: a list of subnets
        or (subnets, exit policy)."""
        subnets, exit = (plan, None) if not isinstance(plan, tuple) else plan
        marker = os.environ.get(FAULT_ENV)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        q = self.search
        n = samples or q.samples
        if n not in self.caches:
            self.caches[n] = PrefixCache(self.caches[q.samples].boundaries)
        cache = self.caches[n]
        if n not in self.full:  # made once (or read from beside the supernet); its latents seed the prefix cache
            self.full[n] = FullReference(full_size_samples(
                self.supernet, n=n, seed_set=SEARCH_SEEDS, seed=seed_for(SEARCH_SEEDS), sampler=q.sampler, eta=q.eta,
                steps=q.steps, batch_size=q.batch_size, device=self.device, denoisers=self.denoisers,
                cache=cache, cache_dir=self.cache_dir))
        run_before, saved_before = cache.steps_run, cache.steps_saved
        result = evaluate(self.supernet, subnets, n=n, seed_set=SEARCH_SEEDS, scorer=self.scorer, full=self.full[n],
                          device=self.device, batch_size=q.batch_size, sampler=q.sampler, eta=q.eta,
                          denoisers=self.denoisers, cache=cache, exit=exit, heads=self.heads)
        spread = result["executed"]["flops_per_image"]["sd"] / 1e9 if result["executed"] else 0.0
        return {"gflops": result["gflops_per_image"], "gflops_sd": spread, "fid": result["fid"], "kid": result["kid"], "drift": result["drift"], "samples": result["n"],
                "seed_set": SEARCH_SEEDS,
                "seconds": round(result["seconds"] + result["eval_seconds"], 3),
                "steps_run": cache.steps_run - run_before, "steps_saved": cache.steps_saved - saved_before}
