"""Streaming quantiles of |x| per input channel, from log-spaced histograms (no activations kept).

Bins are ``1/bins_per_octave`` of an octave wide (64 per octave: 1.1% relative width) between ``2^lo`` and
``2^hi``; values below ``2^lo`` (zeros included) count in an underflow bin, values above in an overflow bin.
Quantiles interpolate linearly in log space inside a bin, so they land well within 1% of the exact ones
for any distribution that is not concentrated on a few values.

Per-channel counts serve every criterion of the form ``|x_j| · c_j ≥ T`` (TEAL: ``c = 1``; WINA:
``c_j = ‖W[:, j]‖``; channel-wise thresholds: one quantile per channel): the fraction of zeroed inputs at
``T`` is the mean over channels of ``CDF_j(T / c_j)``, which a bisection on ``T`` inverts; per-channel
quantiles (``level_thresholds``) come from the same counts.
"""

from __future__ import annotations

import math

import torch


class AbsHistogram:
    """Counts of ``|x|`` per input channel in log-spaced bins; ``update(x)``, then ``cdf``/``threshold``."""

    def __init__(self, channels: int, lo: int = -32, hi: int = 16, bins_per_octave: int = 64):
        self.channels, self.lo, self.hi, self.bpo = channels, lo, hi, bins_per_octave
        self.n_bins = (hi - lo) * bins_per_octave + 2  # + underflow, overflow
        self.counts: torch.Tensor | None = None  # (channels, n_bins) int64
        self.tokens = 0
        self._cum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add tokens ``x`` of shape ``(..., channels)``."""
        x = x.reshape(-1, self.channels)
        if self.counts is None:
            self.counts = torch.zeros(self.channels, self.n_bins, dtype=torch.int64, device=x.device)
        for part in x.split(8192):
            pos = (torch.log2(part.abs().float()) - self.lo) * self.bpo  # -inf for zeros
            idx = (pos.floor() + 1).clamp_(0, self.n_bins - 1).long()  # (t, channels)
            flat = (idx + torch.arange(self.channels, device=x.device) * self.n_bins).reshape(-1)
            # counted in place: bincount would build and add a whole (channels x bins) table per call, which
            # costs more than the counting itself for the few hundred tokens of a position band's share
            self.counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat))
        self.tokens += x.shape[0]
        self._cum = None

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Per-channel fraction of ``|x_j| < t_j`` for thresholds ``t`` ``(channels,)`` (or a scalar)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.counts.device).expand(self.channels)
        if self._cum is None:
            self._cum = torch.cumsum(self.counts, dim=1).double()  # (channels, n_bins): up to and including bin
        cum = self._cum
        pos = ((torch.log2(t.clamp_min(1e-300)) - self.lo) * self.bpo).clamp(-1, self.n_bins - 2)  # in-range bins 1..n-2
        b = pos.floor().long()  # in-range bin index b+1 holds [2^(lo + b/bpo), 2^(lo + (b+1)/bpo))
        frac = (pos - b).clamp(0, 1)
        rows = torch.arange(self.channels, device=cum.device)
        below = cum[rows, b.clamp_min(0)] * (b >= 0)  # everything under the bin t falls in (with underflow)
        inside = self.counts[rows, (b + 1).clamp_max(self.n_bins - 1)].double()
        return (below + frac * inside) / max(self.tokens, 1)

    def threshold(self, sparsity: float, weights: torch.Tensor | None = None) -> float:
        """``T`` such that zeroing inputs with ``|x_j| · weights_j < T`` zeroes ``sparsity`` of all inputs."""
        c = torch.ones(self.channels, dtype=torch.float64) if weights is None else weights.double().cpu()
        c = c.to(self.counts.device)
        live = c > 0
        lo, hi = self.lo * math.log(2) - 40.0, self.hi * math.log(2) + 40.0  # natural-log bracket of T
        for _ in range(100):
            mid = (lo + hi) / 2
            t = torch.where(live, math.exp(mid) / c.clamp_min(1e-300), torch.full_like(c, math.inf))
            frac = float(self.cdf(t).mean())
            lo, hi = (mid, hi) if frac < sparsity else (lo, mid)
        return math.exp((lo + hi) / 2)

    def level_thresholds(self, level: float) -> torch.Tensor:
        """Per-channel ``level``-quantiles of ``|x_j|``, ``(channels,)`` fp32."""
        lo = torch.full((self.channels,), (self.lo - 1) * math.log(2), dtype=torch.float64, device=self.counts.device)
        hi = torch.full_like(lo, (self.hi + 1) * math.log(2))
        for _ in range(60):  # one bisection per channel, all at once
            mid = (lo + hi) / 2
            below = self.cdf(mid.exp()) < level
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return ((lo + hi) / 2).exp().float().cpu()
