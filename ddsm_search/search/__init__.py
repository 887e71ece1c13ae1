"""Search for per-step schedules (solver, steps, timesteps, a subnet and method genes per segment): genome,
ask/tell algorithms, evaluator, Ray runner, Pareto front, baselines."""
