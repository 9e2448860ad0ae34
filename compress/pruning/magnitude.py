"""Magnitude pruning: drop the smallest ``|W|`` (per matrix by default). Baseline of Han et al. 2015."""

import torch


def score(W: torch.Tensor, sq: torch.Tensor | None = None) -> torch.Tensor:
    """``|W|`` ``(out, in)``; the calibration statistic is not used."""
    return W.abs()
