"""Supernet training: the sandwich rule over every axis, in-place distillation, EMA, gradient clipping
and exact resume.

Every random draw of a training step (batch, timesteps, noise, flips, subnets) comes from one CPU
generator whose state is checkpointed, so a run resumed from step k continues exactly as if it had
never stopped. Method families may hook into every step (space.plugins: `training_hook`); a sparse
supernet's masks (methods/sparsity) are drawn from a generator of their own, checkpointed likewise,
and saved beside the weights as an add-on file.

A training hook offers: start(model, ema) once the weights are in place; replaces_step(step) -> True
where it updates instead of the optimizer (then update(model, optimizer, step)); before_optimizer(model);
after_step(model, ema); state_tensors() and restore(out_dir, meta, model, tensors) for an exact resume;
addons(image_shape) -> the checkpoint.AddonFile list to keep beside the supernet.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .backbones.base import SlimModel
from .backbones.cost import flops_table
from .backbones.registry import build_supernet
from .checkpoint import META, load_train_state, save_supernet, supernet_config
from .config import ExperimentConfig
from .data import ImageData, data_key, load_data
from .diffusion import NoiseSchedule
from .errors import DDSMError
from .images import save_grid
from .io import write_text_atomic
from .sampling import Runtime, generate, resolve_device
from .space.plugins import families
from .space.subnet import Subnet, SubnetSpace

LOG_FILE = "loss_log.csv"


def sandwich_subnets(space: SubnetSpace, n_random: int, generator: torch.Generator) -> list[Subnet]:
    """Return the subnets trained this step: the largest, the smallest, then `n_random` drawn uniformly
    from all the others (over every axis at once: a random width with a random depth)."""
    ordered = list(space)  # largest first, smallest last
    chosen = ordered[:1] + ordered[-1:] if len(ordered) > 1 else ordered[:1]
    middle = ordered[1:-1]
    if middle:
        picks = torch.randint(len(middle), (n_random,), generator=generator).tolist()
        chosen += [middle[i] for i in picks]
    return chosen


def warmup_factor(cfg: ExperimentConfig, step: int) -> float:
    """Return the learning rate's factor at `step` (LambdaLR's lambda): linear warm-up, then 1."""
    return min(1.0, (step + 1) / max(1, cfg.train.warmup_steps))


def learning_rate(cfg: ExperimentConfig, step: int) -> float:
    """Return the learning rate at `step`: linear warm-up, then constant (what the LambdaLR sets)."""
    return cfg.train.lr * warmup_factor(cfg, step)


def ema_decay(cfg: ExperimentConfig, step: int) -> float:
    """Return the EMA decay at `step`, ramped up so early averages are not dominated by the random init."""
    return min(cfg.train.ema_decay, (1 + step) / (10 + step))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class TrainingRun:
    """The mutable state of one training run: models, optimizer, generator, step, loss log."""

    def __init__(self, cfg: ExperimentConfig, data: ImageData, device: str):
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(cfg.train.seed)  # initial weights
        self.model = build_supernet(cfg.model, data.shape).to(device)
        # torch's AveragedModel keeps the EMA (a copy of the model; parameters averaged, buffers copied, as
        # the model's are constant). The first update is a decay step like the others (n_averaged starts
        # at 1, not 0, which would copy the model), and each update's decay is ramped (`ema_decay`): the
        # averaging function is get_ema_multi_avg_fn of that step's decay, so the floats are those of the
        # foreach lerp this replaced (tests/test_train.py holds the weights bit-identical).
        self.averaged = AveragedModel(self.model, use_buffers=False)
        self.averaged.n_averaged.fill_(1)
        self.ema = self.averaged.module.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.lr_schedule = LambdaLR(self.opt, lambda step: warmup_factor(cfg, step))
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.schedule = NoiseSchedule(cfg.diffusion)
        self.step = 0
        self.log: list[dict] = []
        self.teacher = None  # with train.teacher "frozen": the init model, frozen, at full size
        if cfg.train.init_from is not None:
            start = load_init(cfg, data.shape, device)
            self.model.load_state_dict(start.state_dict())
            self.ema.load_state_dict(start.state_dict())
            if cfg.train.teacher == "frozen":
                self.teacher = start.set_subnet(start.full).requires_grad_(False).eval()
        # method families' hooks (a sparse supernet's masks), started on the weights training starts from
        self.hooks = [h for f in families() if (h := f.training_hook(cfg, self.model)) is not None]
        for hook in self.hooks:
            hook.start(self.model, self.ema)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return everything besides the EMA weights that resuming needs, as named tensors."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(_optimizer_tensors(self.opt))
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        for hook in self.hooks:
            tensors.update(hook.state_tensors())
        if self.device == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        return tensors

    def restore(self, out_dir: Path) -> None:
        """Load the run's state from the checkpoint in `out_dir` (both weight files hash-checked)."""
        meta, ema_state, tensors = load_train_state(out_dir)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict(ema_state)
        _load_optimizer(self.opt, tensors)
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.device == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step = int(meta["step"])
        # the warm-up where the run stopped (the scheduler is not saved: the step says where it stands)
        self.lr_schedule = LambdaLR(self.opt, lambda step: warmup_factor(self.cfg, step), last_epoch=self.step - 1)
        self.log = [row for row in _read_log(out_dir / LOG_FILE) if row["step"] <= self.step]
        for hook in self.hooks:
            hook.restore(out_dir, meta, self.model, tensors)

    def draw_stage(self, subnets: list | None = None) -> int | None:
        """Return the timestep stage this step trains (a multi-stage supernet, as the paper's loss: one
        stage per batch, uniformly; the stage given subnets name, if they do), or None: one stage only,
        and nothing is drawn."""
        if self.model.num_stages == 1:
            return None
        named = {self.model.check_subnet(s).get("stage") for s in subnets or ()} - {None}
        if len(named) > 1:
            raise DDSMError(f"one training step trains one stage, not stages {sorted(named)}")
        return named.pop() if named else int(torch.randint(self.model.num_stages, (1,), generator=self.generator))

    def batch(self, stage: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x_t, t, noise) for one training batch, all drawn from the run's generator (with a
        `stage`, timesteps uniform within that stage's interval)."""
        g, b = self.generator, self.cfg.train.batch_size
        idx = torch.randint(len(self.data), (b,), generator=g)
        x0 = self.data.to_float(idx)
        if self.cfg.data.hflip:
            flip = torch.rand(b, generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        if stage is None:
            t = torch.randint(self.schedule.timesteps, (b,), generator=g)
        else:
            t = torch.randint(*self.model.stage_timesteps(stage, self.schedule.timesteps), (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, t, noise = x0.to(self.device), t.to(self.device), noise.to(self.device)
        return self.schedule.q_sample(x0, t, noise), t, noise

    def train_step(self, subnets: list | None = None) -> dict[Subnet, float]:
        """Run one step on `subnets` (default: the sandwich rule's draw); return each subnet's loss."""
        tc = self.cfg.train
        stage = self.draw_stage(subnets)
        xt, t, noise = self.batch(stage)
        if subnets is None:  # the sandwich rule within the stage's decoder
            subnets = sandwich_subnets(self.model.stage_space(stage), tc.sandwich_random, self.generator)
        self.opt.zero_grad(set_to_none=True)
        losses, teacher = {}, None
        if self.teacher is not None:  # distil every subnet, full size too, towards the frozen init model
            with torch.no_grad():
                teacher = self.teacher(xt, t)
        for subnet in subnets:
            subnet = self.model.check_subnet(subnet)
            pred = self.model.set_subnet(subnet)(xt, t)
            loss = F.mse_loss(pred, noise)
            if self.teacher is not None:
                if tc.distill_weight > 0:
                    loss = (1 - tc.distill_weight) * loss + tc.distill_weight * F.mse_loss(pred, teacher)
            elif teacher is None:
                teacher = pred.detach()  # the largest subnet comes first: in-place distillation target
            elif tc.distill_weight > 0:
                loss = (1 - tc.distill_weight) * loss + tc.distill_weight * F.mse_loss(pred, teacher)
            loss.backward()
            losses[subnet] = loss.item()
        self.model.set_subnet(self.model.full)
        replacing = [h for h in self.hooks if h.replaces_step(self.step + 1)]
        if replacing:  # RigL's Algorithm 1: a mask-update step updates the connections instead of the weights
            for hook in replacing:
                hook.update(self.model, self.opt, self.step + 1)
        else:
            for hook in self.hooks:
                hook.before_optimizer(self.model)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.opt.step()
        with warnings.catch_warnings():  # the warm-up counts training steps, mask updates too (no optimizer step)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.lr_schedule.step()
        self.averaged.multi_avg_fn = get_ema_multi_avg_fn(ema_decay(self.cfg, self.step))
        self.averaged.update_parameters(self.model)
        for hook in self.hooks:  # the EMA weights too: the masked ones exactly zero in both
            hook.after_step(self.model, self.ema)
        self.step += 1
        return losses


def load_init(cfg: ExperimentConfig, shape, device: str) -> SlimModel:
    """Return the supernet that train.init_from names (its EMA weights), checked against this run's
    model section and, if given, train.init_sha256."""
    from .checkpoint import load_supernet

    init = load_supernet(cfg.train.init_from, device)
    if cfg.train.init_sha256 is not None and init.sha256 != cfg.train.init_sha256:
        raise DDSMError(f"train.init_from: {cfg.train.init_from} is not the supernet this run started from "
                        f"(hash {init.sha256[:12]}, the run's {cfg.train.init_sha256[:12]})")
    if init.config.model != cfg.model or tuple(init.model.image_shape) != tuple(shape):
        raise DDSMError(f"train.init_from: the supernet in {cfg.train.init_from} has another model section or "
                        f"image shape than this experiment (take the model section of its meta.json config)")
    return init.model


def pin_init(cfg: ExperimentConfig) -> ExperimentConfig:
    """Return `cfg` with train.init_sha256 set to the hash of the train.init_from supernet (if any), so
    the checkpoint records what it started from and a resume from another init is refused."""
    tc = cfg.train
    if tc.init_from is None or tc.init_sha256 is not None:
        return cfg
    from .checkpoint import load_supernet

    return replace(cfg, train=replace(tc, init_sha256=load_supernet(tc.init_from).sha256))


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{"step": int(r["step"]), "subnet": r["subnet"], "loss": float(r["loss"])} for r in csv.DictReader(fh)]


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "subnet", "loss"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _with_defaults(saved: dict, search: dict) -> dict:
    """Return a checkpoint's config with the keys added since it was written at their defaults (which
    reproduce what it was trained as), so that only real differences refuse a resume."""
    from .config import config_from_dict

    try:
        return supernet_config(config_from_dict({**saved, "search": search}).to_dict())
    except DDSMError:
        return saved


def _check_resumable(cfg: ExperimentConfig, out: Path, resume: bool) -> dict | None:
    from .checkpoint import read_meta

    if not (out / META).exists():
        if resume:
            raise DDSMError(f"--resume: no checkpoint in {out} to resume from")
        return None
    meta = read_meta(out)
    if not resume:
        raise DDSMError(f"{out} already holds a checkpoint at step {meta['step']}; pass --resume to continue "
                        "or choose another --out")
    saved = _with_defaults(supernet_config(meta["config"]), cfg.to_dict()["search"])
    mine = supernet_config(cfg.to_dict())
    saved["train"] = {**saved["train"], "steps": mine["train"]["steps"]}  # the target may be extended
    if saved != mine:
        diff = sorted(k for k in mine if mine[k] != saved.get(k))
        raise DDSMError(f"--resume: the config differs from the checkpoint's in: {', '.join(diff)}")
    return meta


def grid_subnets(space: SubnetSpace) -> list[Subnet]:
    """Return the subnets shown in sample grids: full size, then each axis's choices with the others full."""
    return list(dict.fromkeys(s for axis in space.names for s in space.along(axis)))


def write_sample_grids(supernet, out: Path, device: str, seed: int = 0, progress: bool = False) -> list[Path]:
    """Write one PNG grid per subnet of `grid_subnets` of a loaded supernet, every grid from the same
    noise; return their paths."""
    cfg, model = supernet.config, supernet.model
    runtime = Runtime(supernet, device=device, batch_size=cfg.sample.batch_size)
    paths = []
    for subnet in tqdm(grid_subnets(model.space), desc="sample grids", unit="subnet", disable=not progress):
        plan = runtime.plan([subnet] * cfg.sample.steps)  # the config's sampler
        images = generate(plan, n=cfg.sample.grid_size, seed=seed, batch_size=cfg.sample.batch_size,
                          progress=progress, desc=subnet.key)
        paths.append(save_grid(out / "samples" / f"{subnet.slug}.png", images))
    return paths


def train(cfg: ExperimentConfig, out_dir: str | Path, *, steps: int | None = None, device: str = "auto",
          resume: bool = False, progress: bool = True, grids: bool = True, data: ImageData | None = None) -> Path:
    """Train the supernet (or resume it) up to `steps` total steps; return the checkpoint directory."""
    if steps is not None:
        if steps < 1:
            raise DDSMError(f"--train-steps must be at least 1, got {steps}")
        cfg = replace(cfg, train=replace(cfg.train, steps=steps))
    from .config import validate

    validate(cfg)  # a config built in Python gets the checks a YAML file gets
    out = Path(out_dir)
    cfg = pin_init(cfg)
    _check_resumable(cfg, out, resume)
    device = resolve_device(device)
    data = data if data is not None else load_data(cfg.data)
    run = TrainingRun(cfg, data, device)
    if resume:
        run.restore(out)
    flops = flops_table(cfg.model, data.shape)
    tc, window = cfg.train, {}
    bar = tqdm(total=tc.steps, initial=run.step, desc="training", unit="step", disable=not progress)
    started = time.perf_counter()

    def checkpoint() -> None:
        _write_log(out / LOG_FILE, run.log)
        addons = [a for hook in run.hooks for a in hook.addons(data.shape)]
        save_supernet(out, config=cfg, ema=run.ema, train_state=run.state_tensors(), step=run.step, flops=flops,
                      dataset=data_key(cfg.data), addons=addons)

    while run.step < tc.steps:
        for subnet, loss in run.train_step().items():
            window.setdefault(subnet, []).append(loss)
        if run.step % tc.log_every == 0 or run.step == tc.steps:
            means = {s: sum(v) / len(v) for s, v in window.items()}
            order = [s for s in run.model.space if s in means]  # largest first
            run.log += [{"step": run.step, "subnet": s.key, "loss": round(means[s], 6)} for s in order]
            bar.set_postfix({"full": f"{means[order[0]]:.4f}", "smallest": f"{means[order[-1]]:.4f}"})
            window = {}
        if run.step % tc.checkpoint_every == 0 or run.step == tc.steps:
            checkpoint()
        bar.update(1)
    bar.close()
    if not (out / META).exists():  # resumed at or past the target: nothing trained, nothing written yet
        checkpoint()
    if progress:
        print(f"trained {cfg.name} to step {run.step} in {time.perf_counter() - started:.0f} s -> {out}")
    if grids:
        from .checkpoint import load_supernet

        paths = write_sample_grids(load_supernet(out, device), out, device, progress=progress)
        if progress:
            print(f"sample grids: {', '.join(str(p) for p in paths)}")
    return out
