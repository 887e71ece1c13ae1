"""The solvers and timestep spacings by name: plain data, so that the command line can list them without
importing torch."""

# name -> (what it is, its options and their defaults); ddim and ddpm are this project's own updates,
# the others diffusers' schedulers (solvers/schedulers.py). `clip`: the predicted x0 clipped to [-1, 1]
# before each update, as DDIM and DDPM always do (diffusers' thresholding with sample_max_value 1)
SOLVERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIM, x0 clipped to [-1, 1]; eta > 0 adds noise", {"eta": 0.0}),
    "ddpm": ("ancestral DDPM over the respaced chain, x0 clipped", {}),
    "dpmsolver++": ("diffusers' DPM-Solver++ multistep (order 1, 2: 2M, 3: 3M), x0 clipped unless clip=False",
                    {"order": 2, "clip": True}),
    "sde-dpmsolver++": ("diffusers' SDE-DPM-Solver++ (order 1 or 2; stochastic), x0 clipped unless clip=False",
                        {"order": 2, "clip": True}),
    "unipc": ("diffusers' UniPC multistep, bh2 (order 1, 2 or 3), x0 clipped unless clip=False",
              {"order": 2, "clip": True}),
    "euler": ("diffusers' Euler (discrete), no clipping", {}),
}
SPACINGS = ("uniform", "linspace", "leading", "trailing")
