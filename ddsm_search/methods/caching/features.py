"""The step runtime of feature caching: a keep step runs the full network and keeps one branch's
features in the run's state; a reuse step runs the outer part from them (the backbone's `deep_forward`).

Both are `stateful` denoisers (see diffusion.sample_loop): called on the whole batch with the run's
state dict, they chunk it themselves, so the features kept for image k are those reused for image k
whatever the batch size, and a prefix cache that copies the state resumes them exactly.
"""

from __future__ import annotations

import torch

from ...errors import DDSMError

SLOT = "caching"  # the key of the kept features in a run's state


class KeepStep:
    """A full step that keeps, for the reuse steps after it, the features of `branch`."""

    stateful = True

    def __init__(self, network, branch: int, owner):
        self.network, self.branch, self.owner = network, branch, owner

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, state: dict, batch_size: int) -> torch.Tensor:
        outs, kept = [], []
        for chunk in x.split(batch_size):
            eps, features = self.network.deep_forward(chunk, t, record=(self.branch,))
            outs.append(eps)
            kept.append(features[self.branch])
        state[SLOT] = (self.owner, self.branch, kept[0] if len(kept) == 1 else torch.cat(kept))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class ReuseStep:
    """A cached step: the `branch` outermost part of the network, the rest from the kept features."""

    stateful = True

    def __init__(self, network, branch: int, owner):
        self.network, self.branch, self.owner = network, branch, owner

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, state: dict, batch_size: int) -> torch.Tensor:
        kept = state.get(SLOT)
        if kept is None or kept[:2] != (self.owner, self.branch) or len(kept[2]) != len(x):
            raise DDSMError(f"a cached step of {self.owner} at branch {self.branch} found no features kept for it "
                            "(a keep step of the same network and branch must come first)")
        features = kept[2]
        outs = [self.network.deep_forward(chunk, t, branch=self.branch, feature=f)[0]
                for chunk, f in zip(x.split(batch_size), features.split(batch_size))]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
