"""Generate images from a supernet with a schedule (one subnet per step), each subnet run as a static
exported network."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import DiffusionConfig
from .diffusion import NoiseSchedule, check_schedule, sample_loop, sampling_timesteps
from .errors import DDSMError
from .backbones.base import SlimModel
from .methods.early_exit.policy import ExitPolicy, ExitRecord, step_keys
from .methods.step_groups.weights import GroupStep


def resolve_device(device: str) -> str:
    """Return 'cuda' or 'cpu' for 'auto' | 'cpu' | 'cuda', or raise DDSMError if CUDA is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DDSMError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise DDSMError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    return device


def make_denoisers(model: SlimModel, subnets: Sequence, device: str, backend: str | dict = "torch",
                   batch_size: int | None = None, heads=None, weights=None) -> dict:
    """Return one denoiser per distinct step: its static network, in eval mode on `device`, run on
    `backend` (torch | fused | auto: the faster here at `batch_size` images, see backends.choice; or
    {subnet key: backend}, a choice made before, e.g. by a search's driver for all its workers).

    A step may also be (subnet, threshold), a step of a dynamic exit policy (exit_policy.step_keys):
    it runs the subnet's exported network on torch with the certainty `heads` (exit_stage.load_exit_heads),
    each image leaving at the first of the supernet's depth choices, up to the subnet's, whose
    certainty reaches the threshold. A step may also be a GroupStep (group_weights.GroupWeights.step_keys):
    its subnet exported with its group's fine-tuned `weights` loaded, on `backend` as a subnet is.

    Exported subnets hold contiguous, already-sliced weights (and only the blocks they run), so
    sampling pays no slicing cost and a smaller subnet is genuinely cheaper.
    """
    from .backends.choice import choose

    steps = list(dict.fromkeys(subnets))
    dynamic = [k for k in steps if isinstance(k, tuple)]
    grouped = [k for k in steps if isinstance(k, GroupStep)]
    # a subnet that leaves its stage to the step (multi-stage U-Net) stands for one network per stage
    distinct = dict.fromkeys(c for s in steps if not isinstance(s, (tuple, GroupStep)) for c in model.concrete(s))
    nets = {s: model.export(s).to(device).eval() for s in distinct}
    if grouped:
        if weights is None:
            raise DDSMError("a schedule with fine-tuned group weights needs them (settings.weights)")
        nets.update({k: weights.network(model, k, device) for k in grouped})
    if isinstance(backend, dict):
        from .backends import wrap

        out = {s: wrap(net, backend.get(_subnet_of(s).key, "torch")) for s, net in nets.items()}
    elif backend == "torch" or not nets:
        out = nets
    else:
        out = choose(nets, model.image_shape, batch_size or 500, backend, device)
    if dynamic:
        from .methods.early_exit.heads import DynamicExitDenoiser

        if heads is None:
            raise DDSMError("a schedule with an exit policy needs the supernet's exit heads (finetune-exit)")
        exits = model.space.choices("depth")
        for subnet, threshold in dynamic:
            subnet = model.check_subnet(subnet)
            out[(subnet, threshold)] = DynamicExitDenoiser(model.export(subnet).to(device).eval(), heads, threshold,
                                                           exits=[d for d in exits if d <= subnet["depth"]])
    return out


def _subnet_of(step):
    """Return the subnet a step key runs (a Subnet, or a GroupStep's)."""
    return step.subnet if isinstance(step, GroupStep) else step


def plan_steps(model: SlimModel, subnets: Sequence, exit: ExitPolicy | None = None, weights=None) -> list:
    """Return what each step runs: subnets, (subnet, threshold) for an exit policy's dynamic steps, or
    GroupStep with fine-tuned group `weights` (an exit policy with group weights is refused)."""
    if weights is None:
        return step_keys(subnets, exit)
    if exit is not None and exit.dynamic:
        raise DDSMError("an exit policy together with fine-tuned group weights is not supported (the exit heads "
                        "were trained on the supernet's weights)")
    return weights.step_keys(subnets, model.space)


class PrefixCache:
    """Latents after the first k steps of a schedule, keyed by those k subnets, for one sampling setup.

    Two schedules that start with the same subnets, run from the same noise (common random numbers),
    pass through identical latents, so a later schedule can resume from the longest shared prefix.
    The generator state is stored too, so stochastic samplers resume exactly as well. Entries are
    kept at the given step boundaries only, least recently used first out beyond `max_bytes`.
    """

    def __init__(self, boundaries: Sequence[int], max_bytes: int = 512 << 20):
        self.boundaries = set(int(b) for b in boundaries)
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.steps_run = 0
        self.steps_saved = 0

    def longest(self, subnets: Sequence) -> tuple[int, tuple | None]:
        """Return (k, (latent, generator state, what an exit record holds of those steps)) for the longest
        cached prefix of `subnets` (the steps' keys: subnets, or (subnet, threshold)), or (0, None)."""
        for k in sorted(self.boundaries, reverse=True):
            key = tuple(subnets[:k])
            if k < len(subnets) and key in self.entries:
                self.entries.move_to_end(key)
                return k, self.entries[key]
        return 0, None

    def store(self, subnets: Sequence, k: int, x: torch.Tensor, state: torch.Tensor, record=None) -> None:
        """Keep the latent after the first `k` steps of `subnets`, if `k` is a boundary (with `record`'s
        depths and FLOPs of those steps, so that a run resumed from it accounts for them)."""
        key = tuple(subnets[:k])
        if k not in self.boundaries or key in self.entries:
            return
        x = x.detach().to("cpu", copy=True)
        self.entries[key] = (x, state, record.prefix(k) if record is not None else {})
        self.nbytes += x.nbytes
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, (old, _, _) = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes


def generate(model: SlimModel, diffusion: DiffusionConfig, subnets: Sequence, *, n: int, seed: int,
             sampler: str = "ddim", eta: float = 0.0, batch_size: int = 500, device: str = "cpu",
             progress: bool = False, denoisers: dict | None = None, cache: PrefixCache | None = None,
             backend: str = "torch", exit: ExitPolicy | None = None, heads=None,
             record: ExitRecord | None = None, weights=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Return `n` images in [-1, 1] (CPU tensor) sampled with one subnet per step from the seed's noise.

    Subnets run on `backend` unless `denoisers` are given. With an `exit` policy, its dynamic steps
    exit per image with the certainty `heads` (or denoisers made for them by `make_denoisers`), and
    `record` receives each dynamic step's depths and FLOPs per image. With group `weights`
    (group_weights.GroupWeights), each step runs its group's fine-tuned copy of its subnet. A `cache` must
    only ever see one (model, n, seed, sampler, eta, number of steps) setup. A CPU `generator` given
    replaces the seed's (the noise is drawn from it as it stands, then the sampler's step noise).
    """
    if n < 1:
        raise DDSMError(f"the number of images must be at least 1, got {n}")
    timesteps = sampling_timesteps(diffusion.timesteps, len(subnets))
    check_schedule(subnets, timesteps)
    subnets = model.step_subnets(subnets, timesteps)  # checked; a multi-stage U-Net's with each step's stage
    steps = plan_steps(model, subnets, exit, weights)
    if record is None and exit is not None and exit.dynamic:  # so that cached prefixes carry what steps executed
        record = ExitRecord()
    if denoisers is None:
        denoisers = make_denoisers(model, steps, device, backend, min(n, batch_size), heads=heads, weights=weights)
    missing = [k for k in dict.fromkeys(steps) if k not in denoisers]
    if missing:
        raise DDSMError(f"no denoiser for step {missing[0]!r}: make the denoisers for this schedule's steps")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same images on any device
    elif generator.device.type != "cpu":
        raise DDSMError(f"the generator must be a CPU generator (the same images on any device), not "
                        f"{generator.device}")
    x = torch.randn((n, *model.image_shape), generator=generator)
    start = 0
    if cache is not None:
        start, hit = cache.longest(steps)
        if hit is not None:
            x = hit[0]
            generator.set_state(hit[1])
            if record is not None:
                record.restore(hit[2])
        cache.steps_saved += start
        cache.steps_run += len(subnets) - start
    bar = tqdm(total=len(subnets), initial=start, desc="sampling", unit="step", disable=not progress, leave=False)

    def after_step(i: int, latent: torch.Tensor) -> None:
        bar.update(1)
        drain = getattr(denoisers[steps[i]], "drain", None)
        if drain is not None:  # a dynamic step: what each image executed
            depths, flops = drain()
            if record is not None:
                record.add(i, depths, flops)
        if cache is not None:
            cache.store(steps, i + 1, latent, generator.get_state(), record)

    out = sample_loop(denoisers, NoiseSchedule(diffusion), steps, timesteps, x.to(device), sampler=sampler, eta=eta,
                      generator=generator, batch_size=batch_size, callback=after_step, start=start)
    bar.close()
    return out.cpu()


def time_against_full(model: SlimModel, diffusion: DiffusionConfig, subnets: Sequence, *, n: int, seed: int,
                      sampler: str = "ddim", eta: float = 0.0, batch_size: int = 500, device: str = "cpu",
                      progress: bool = False, backend: str = "auto", repeats: int = 3,
                      exit: ExitPolicy | None = None, heads=None,
                      record: ExitRecord | None = None, weights=None) -> tuple[torch.Tensor, float, float, dict]:
    """Return (the schedule's images, its seconds, full size's seconds, {step: the backend it ran on})
    for the same batch and noise, each time the median of `repeats` runs, schedule and full size taking
    turns (a single pair of runs on a shared 2-core machine gave speed-ups from 1.26x to 1.65x).

    With backend "auto" each subnet runs on the faster backend on this machine, measured first, so
    full size's time is that of the fastest full-size path. Subnets are exported and each warmed up
    first, so both timings are of sampling alone. With an `exit` policy its dynamic steps exit per
    image (torch), and `record` gets what they executed in the first timed run. With group `weights`
    each step runs its group's fine-tuned network.
    """
    import statistics

    from .backends import backend_of

    if repeats < 1:
        raise DDSMError(f"repeats must be at least 1, got {repeats}")
    timesteps = sampling_timesteps(diffusion.timesteps, len(subnets))
    subnets = model.step_subnets(subnets, timesteps)
    full = model.step_subnets([model.full] * len(subnets), timesteps)
    steps = plan_steps(model, subnets, exit, weights)
    denoisers = make_denoisers(model, steps + full, device, backend, min(n, batch_size), heads=heads,
                               weights=weights)
    paths = {s: "torch" if isinstance(s, tuple) else backend_of(d) for s, d in denoisers.items()}
    at = {}  # a timestep each step key runs at (a multi-stage U-Net's subnet refuses other stages')
    for s, t in zip(steps + full, timesteps + timesteps):
        at.setdefault(s, t)
    for s in denoisers:  # warm-up: allocation and kernel choice are not sampling speed
        if isinstance(s, GroupStep) or model.num_stages > 1:  # its network alone, on a batch of the timed size
            with torch.inference_mode():
                denoisers[s](torch.randn((min(n, batch_size), *model.image_shape),
                                         generator=torch.Generator().manual_seed(seed)).to(device),
                             torch.tensor(at.get(s, diffusion.timesteps - 1), device=device))
            continue
        warm = ExitPolicy((s[1],)) if isinstance(s, tuple) else None
        generate(model, diffusion, [s[0] if warm else s], n=min(n, batch_size), seed=seed, batch_size=batch_size,
                 device=device, denoisers=denoisers, exit=warm)
    images, seconds = None, {"schedule": [], "full": []}
    for i in range(repeats):
        for name, plan in (("schedule", subnets), ("full", full)):
            mine = record if name == "schedule" and i == 0 else None
            started = time.perf_counter()
            out = generate(model, diffusion, plan, n=n, seed=seed, sampler=sampler, eta=eta, batch_size=batch_size,
                           device=device, progress=progress and i == 0, denoisers=denoisers,
                           exit=exit if name == "schedule" else None, record=mine,
                           weights=weights if name == "schedule" else None)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
            if name == "schedule" and images is None:
                images = out
    return images, statistics.median(seconds["schedule"]), statistics.median(seconds["full"]), paths
