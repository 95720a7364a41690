"""Random draws shared by the batch-mixing data techniques (``mixup``, ``cutmix``; not a plugin itself).

Every draw happens on the batch's device from the trial's own generator, so the training loop never waits for
the device, and a trial is reproducible from its seed without touching the global random state (which dropout
and the model's initialisation use).
"""
from __future__ import annotations

import torch

#: added to the trial's seed, so that the mixing draws are not the same stream as the batch order's.
SEED_OFFSET = 104_729


class BatchMixer:
    """Draws, for each batch, a mixing weight ``lam ~ Beta(alpha, alpha)`` (a 0-d float32 tensor) and a random
    permutation of the batch (the partner of each sample)."""

    def __init__(self, alpha: float, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed + SEED_OFFSET)
        # float64: Gamma(alpha) draws of a small alpha underflow float32 to 0 (then 0 / 0)
        self._alphas = torch.full((2,), float(alpha), dtype=torch.float64, device=device)

    def lam(self) -> torch.Tensor:
        """Beta(alpha, alpha) as X / (X + Y) with X, Y ~ Gamma(alpha): torch's Beta takes no generator."""
        gammas = torch._standard_gamma(self._alphas, generator=self.generator)
        return (gammas[0] / gammas.sum()).nan_to_num(0.5).float()

    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, device=self.device, generator=self.generator)

    def uniform(self) -> torch.Tensor:
        """A 0-d float32 tensor uniform in [0, 1)."""
        return torch.rand((), device=self.device, generator=self.generator)
