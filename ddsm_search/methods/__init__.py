"""Method families, one folder each, plugged into the step-aware space through `space.plugins`:
early_exit, step_groups, multistage, sparsity, pretrained. A family imports nothing of another."""
