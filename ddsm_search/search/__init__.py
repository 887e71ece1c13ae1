"""Search for per-step width schedules: genome, ask/tell algorithms, evaluator, Ray runner."""
