"""A solver's whole run as fixed linear combinations, for a runner without torch or diffusers.

Given its timesteps, every solver here but DDIM and DDPM (whose x0 clipping is not linear) is linear
in the initial latent x_T, the model outputs eps_0 .. eps_{S-1} and, for SDE-DPM-Solver++, the step
noises z_0 .. z_{S-1} (no thresholding or clipping is enabled, solvers/schedulers.py). So the latent
after step i is

    x_{i+1} = c_i * x_T + sum_{j <= i} c_ij * eps_j + sum_{k <= i} d_ik * z_k

and the network's input at step i is s_i * x_i. Rather than write the DPM-Solver++, UniPC and Euler
updates out again (a second copy to keep equal to diffusers), the coefficients are read off the very
scheduler `Solver.run` builds: each step runs on one-hot float64 vectors, its latent, its eps and its
noise each a basis vector of their own, so one pass gives each step's update in terms of the latents
it started from; these are then composed in float64 into the form above.

Why a fresh basis vector for each step's latent instead of feeding x_T = e_0 through the steps: diffusers'
DPM-Solver++ and Euler cast the latent to float32 inside every step (`sample.to(torch.float32)`), which
would round the coefficients carried in it to float32 at each step (measured at T = 1000: up to 4e-7
relative, moving the last latent by up to 6e-5 on unit-normal inputs); a one-hot vector is exact in
float32, so no coefficient is rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import DDSMError


@dataclass(frozen=True)
class LinearForm:
    """A solver's run over fixed timesteps as linear combinations (float64 coefficients).

    `latent[i]`: the latent after step i over (x_T, eps_0, .., eps_i); `noise[i]`: its coefficients of the
    step noises of `noise_steps` up to step i (the steps whose noise reaches some latent);
    `model_input_scale[i]`: s_i; `init_noise_sigma`: x_T is that times standard normal noise.
    """

    init_noise_sigma: float
    model_input_scale: tuple[float, ...]
    latent: tuple[tuple[float, ...], ...]
    noise_steps: tuple[int, ...]
    noise: tuple[tuple[float, ...], ...]


def linear_form(solver, noise_schedule, timesteps: Sequence[int]) -> LinearForm:
    """Return the linear form of `solver` (a solvers.Solver but DDIM or DDPM) over `timesteps` of
    `noise_schedule`, read off the run `solver.run` makes."""
    if solver.name in ("ddim", "ddpm"):
        raise DDSMError(f"solver {solver} clips its predicted x0 to [-1, 1]: it is not linear in its inputs")
    steps = len(timesteps)
    run = solver.run(noise_schedule, timesteps)
    size = 3 * steps  # the latent each step starts from, each step's eps, each step's noise

    def basis(k: int) -> torch.Tensor:
        v = torch.zeros((1, 1, 1, size), dtype=torch.float64)  # an image batch of one: what the schedulers expect
        v[..., k] = 1.0
        return v

    rows, scales = [], []
    for i in range(steps):
        y = basis(i)
        seen = run.model_input(y, i)
        scale = float(seen[..., i])
        if seen.dtype != torch.float64 or not torch.equal(seen, scale * y):
            raise DDSMError(f"solver {solver}: the model input at step {i} is not the latent times a number")
        out = run.advance(i, basis(steps + i), y, basis(2 * steps + i) if solver.stochastic else None)
        if out.dtype != torch.float64:  # a rounded coefficient would go unnoticed: refuse instead
            raise DDSMError(f"solver {solver}: diffusers' step {i} returned {out.dtype}, not float64")
        rows.append(out.reshape(-1).numpy())
        scales.append(scale)
    update = np.stack(rows)  # step i's latent over (y_0 .. y_{S-1}, eps_0 .. eps_{S-1}, z_0 .. z_{S-1})
    if not np.isfinite(update).all() or not np.isfinite(scales).all():
        raise DDSMError(f"solver {solver}: a coefficient is not finite on timesteps {list(timesteps)}")
    # compose: y_0 = x_T, y_{i+1} = the latent after step i, over (x_T, eps_0 .. eps_{S-1}, z_0 .. z_{S-1})
    form = np.zeros((steps + 1, 1 + 2 * steps))
    form[0, 0] = 1.0
    for i in range(steps):
        form[i + 1] = update[i, :steps] @ form[:steps]
        form[i + 1, 1:] += update[i, steps:]
    eps, noise = form[:, 1:1 + steps], form[:, 1 + steps:]
    noise_steps = tuple(k for k in range(steps) if np.any(noise[:, k] != 0))
    return LinearForm(
        init_noise_sigma=float(run.init_noise_sigma),
        model_input_scale=tuple(scales),
        latent=tuple((float(form[i + 1, 0]), *map(float, eps[i + 1, :i + 1])) for i in range(steps)),
        noise_steps=noise_steps,
        noise=tuple(tuple(float(noise[i + 1, k]) for k in noise_steps if k <= i) for i in range(steps)),
    )
