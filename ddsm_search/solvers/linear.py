"""A solver's whole run as fixed linear maps around its predicted x0, for a runner without torch or diffusers.

Every solver here but DDIM and DDPM works in data prediction. Step i turns the model output eps_i into
a predicted x0 by an affine map of the latent x_i it starts from and eps_i, clips it to [-1, 1] if the
solver clips (diffusers' thresholding at sample_max_value 1, solvers/schedulers.py), and its update is
then linear, given the timesteps, in the initial latent x_T, the x0 predictions of this and earlier
steps (UniPC's corrector included) and, for SDE-DPM-Solver++, the step noises z_0 .. z_{S-1}:

    x0_i    = clip?(a_i * x_i + b_i * eps_i)
    x_{i+1} = c_i * x_T + sum_{j <= i} d_ij * x0_j + sum_{k <= i} e_ik * z_k

and the network's input at step i is s_i * x_i. The clip is the one step that is not linear; without
it (clip=False, and Euler, which never clips) the same form holds with no clip. Rather than write the
DPM-Solver++, UniPC and Euler updates out again (a second copy to keep equal to diffusers), every
coefficient is read off the very scheduler `Solver.run` builds, run on one-hot float64 vectors (the
latent each step starts from, its eps, its x0 and its noise each a basis vector of their own), so one
pass gives each step's x0 map and its update in terms of the vectors it was given; the updates are then
composed in float64 into the form above. Thresholding is off during this pass, and the x0 is taken
where diffusers computes it:

- DPM-Solver++ and UniPC: the scheduler's `convert_model_output` (where diffusers computes x0 from the
  model output and thresholds it) is wrapped: the wrapper records the x0 it computes (a_i, b_i) and
  hands the step a basis vector of its own instead, so the step's output comes over the x0 of this
  and earlier steps;
- Euler: a_i and b_i are the `pred_original_sample` its step returns, and the update is read off a
  twin of its scheduler built from the same config with `prediction_type="sample"` (the model output
  is then x0 itself).

Why a fresh basis vector for each step's latent instead of feeding x_T = e_0 through the steps: diffusers'
DPM-Solver++ and Euler cast the latent to float32 inside every step (`sample.to(torch.float32)`), which
would round the coefficients carried in it to float32 at each step (measured at T = 1000: up to 4e-7
relative, moving the last latent by up to 6e-5 on unit-normal inputs); a one-hot vector is exact in
float32, so no coefficient is rounded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from ..errors import DDSMError


@dataclass(frozen=True)
class LinearForm:
    """A solver's run over fixed timesteps as linear maps around its predicted x0 (float64 coefficients).

    `x0[i]`: (a_i, b_i), step i's x0 = a_i * x_i + b_i * eps_i, clipped to [-1, 1] if `clip`;
    `latent[i]`: the latent after step i over (x_T, x0_0, .., x0_i); `noise[i]`: its coefficients of the
    step noises of `noise_steps` up to step i (the steps whose noise reaches some latent);
    `model_input_scale[i]`: s_i; `init_noise_sigma`: x_T is that times standard normal noise.
    """

    init_noise_sigma: float
    model_input_scale: tuple[float, ...]
    x0: tuple[tuple[float, float], ...]
    clip: bool
    latent: tuple[tuple[float, ...], ...]
    noise_steps: tuple[int, ...]
    noise: tuple[tuple[float, ...], ...]


class _ConvertProbe:
    """DPM-Solver++ and UniPC: their run with `convert_model_output` wrapped to record each step's x0 and
    hand the step a vector of the caller's in its place."""

    def __init__(self, solver, noise_schedule, timesteps):
        self.solver, self.run = solver, replace(solver, clip=False).run(noise_schedule, timesteps)
        scheduler = self.run.scheduler
        convert = scheduler.convert_model_output
        self.seen, self.x0 = [], None

        def swap(model_output, *args, **kwargs):
            self.seen.append(convert(model_output, *args, **kwargs))
            return self.x0

        scheduler.convert_model_output = swap  # on this instance only

    def model_input(self, y: torch.Tensor, i: int) -> torch.Tensor:
        return self.run.model_input(y, i)

    def step(self, i: int, y, eps, x0, z) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (the x0 the scheduler computes from y and eps, its step's output given `x0` as that x0)."""
        self.seen, self.x0 = [], x0
        out = self.run.advance(i, eps, y, z)
        if len(self.seen) != 1:
            raise DDSMError(f"solver {self.solver}: diffusers' step {i} converted its model output {len(self.seen)} "
                            "times, not once: its x0 cannot be read off")
        return self.seen[0], out


class _EulerProbe:
    """Euler: its run for the x0 of each step (`pred_original_sample`), and a twin predicting x0 itself
    (`prediction_type="sample"`) for the update."""

    def __init__(self, solver, noise_schedule, timesteps):
        from .schedulers import set_timesteps

        self.solver, self.run = solver, solver.run(noise_schedule, timesteps)
        scheduler = self.run.scheduler
        self.twin = type(scheduler).from_config(scheduler.config, prediction_type="sample")
        set_timesteps(self.twin, timesteps)
        same = torch.equal(self.twin.sigmas, scheduler.sigmas) and torch.equal(self.twin.timesteps, scheduler.timesteps)
        if not same:
            raise DDSMError(f"solver {solver}: its x0-predicting twin has other sigmas or timesteps")

    def model_input(self, y: torch.Tensor, i: int) -> torch.Tensor:
        seen = self.run.model_input(y, i)
        if not torch.equal(self.twin.scale_model_input(y, self.twin.timesteps[i]), seen):
            raise DDSMError(f"solver {self.solver}: its x0-predicting twin scales the model input otherwise")
        return seen

    def step(self, i: int, y, eps, x0, z) -> tuple[torch.Tensor, torch.Tensor]:
        scheduler = self.run.scheduler
        pred = scheduler.step(eps, scheduler.timesteps[i], y, return_dict=False)[1]
        return pred, self.twin.step(x0, self.twin.timesteps[i], y, return_dict=False)[0]


def linear_form(solver, noise_schedule, timesteps: Sequence[int]) -> LinearForm:
    """Return the linear form of `solver` (a solvers.Solver but DDIM or DDPM) over `timesteps` of
    `noise_schedule`, read off the run `solver.run` makes (with thresholding off)."""
    if solver.name in ("ddim", "ddpm"):
        raise DDSMError(f"solver {solver} is written out by the ONNX sampler itself (DDIM and DDPM recompute eps "
                        "from the clipped x0): it has no linear form")
    steps = len(timesteps)
    probe = _EulerProbe(solver, noise_schedule, timesteps) if solver.name == "euler" else \
        _ConvertProbe(solver, noise_schedule, timesteps)
    Y, EPS, X0, Z = (k * steps for k in range(4))  # where each kind of basis vector starts
    size = 4 * steps

    def basis(k: int) -> torch.Tensor:
        v = torch.zeros((1, 1, 1, size), dtype=torch.float64)  # an image batch of one: what the schedulers expect
        v[..., k] = 1.0
        return v

    rows, scales, x0_maps = [], [], []
    for i in range(steps):
        y = basis(Y + i)
        seen = probe.model_input(y, i)
        scale = float(seen[..., Y + i])
        if seen.dtype != torch.float64 or not torch.equal(seen, scale * y):
            raise DDSMError(f"solver {solver}: the model input at step {i} is not the latent times a number")
        x0, out = probe.step(i, y, basis(EPS + i), basis(X0 + i), basis(Z + i) if solver.stochastic else None)
        for what, v in (("x0", x0), ("step", out)):
            if v.dtype != torch.float64:  # a rounded coefficient would go unnoticed: refuse instead
                raise DDSMError(f"solver {solver}: diffusers' {what} at step {i} came as {v.dtype}, not float64")
        x0, out = x0.reshape(-1).numpy(), out.reshape(-1).numpy()
        a, b = float(x0[Y + i]), float(x0[EPS + i])
        others = np.delete(x0, [Y + i, EPS + i])
        if np.any(others != 0) or b == 0:
            raise DDSMError(f"solver {solver}: the x0 of step {i} is not a map of its latent and its model output")
        if np.any(out[EPS:X0] != 0) or np.any(out[X0 + i + 1:Z] != 0):
            raise DDSMError(f"solver {solver}: step {i}'s update reads the model output other than through its x0")
        rows.append(out)
        scales.append(scale)
        x0_maps.append((a, b))
    update = np.stack(rows)  # step i's latent over (y_0 .. y_{S-1}, eps_*, x0_0 .. x0_{S-1}, z_0 .. z_{S-1})
    if not np.isfinite(update).all() or not np.isfinite(scales).all() or not np.isfinite(x0_maps).all():
        raise DDSMError(f"solver {solver}: a coefficient is not finite on timesteps {list(timesteps)}")
    # compose: y_0 = x_T, y_{i+1} = the latent after step i, over (x_T, x0_0 .. x0_{S-1}, z_0 .. z_{S-1})
    form = np.zeros((steps + 1, 1 + 2 * steps))
    form[0, 0] = 1.0
    for i in range(steps):
        form[i + 1] = update[i, Y:EPS] @ form[:steps]
        form[i + 1, 1:] += update[i, X0:]
    x0_of, noise = form[:, 1:1 + steps], form[:, 1 + steps:]
    noise_steps = tuple(k for k in range(steps) if np.any(noise[:, k] != 0))
    return LinearForm(
        init_noise_sigma=float(probe.run.init_noise_sigma),
        model_input_scale=tuple(scales),
        x0=tuple(x0_maps),
        clip=bool(solver.clip),
        latent=tuple((float(form[i + 1, 0]), *map(float, x0_of[i + 1, :i + 1])) for i in range(steps)),
        noise_steps=noise_steps,
        noise=tuple(tuple(float(noise[i + 1, k]) for k in noise_steps if k <= i) for i in range(steps)),
    )
