"""Solvers: the update rule from one sampling step to the next (`base.Solver`), as this project writes
DDIM and DDPM (`ddim`) and as diffusers' schedulers write DPM-Solver++, UniPC and Euler (`schedulers`),
and the timestep grids they run on; `names` lists them without importing torch."""
