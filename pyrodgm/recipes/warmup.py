"""KL warm-up (Sønderby et al. 2016), shared by the recipes that use it (CaGeM, the
two-layer VAE, IWAE and the Ladder VAE)."""

from __future__ import annotations

__all__ = ["kl_warmup_weight"]


def kl_warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """The KL weight of 0-based ``epoch``: ``epoch / warmup_epochs`` capped at 1 (from 0 to
    1, linearly, over the first ``warmup_epochs``), 1 without warm-up."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup epochs must be non-negative, got {warmup_epochs}")
    return 1.0 if warmup_epochs == 0 else min(1.0, epoch / warmup_epochs)
