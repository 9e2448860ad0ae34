"""Statistics accumulators over calibration inputs: ``init``, ``update(x)``, ``finalize()``.

Two statistics of a linear's input, both fp32 running means over tokens:
- ``SquaredNorms``: ``mean_t x_t²`` per input channel, Wanda's (squared, scaled) column norm; cheap.
- ``Gram``: ``G = mean_t x_t x_tᵀ``, SparseGPT's and GPTQ's Hessian (up to a factor 2), and the exact
  reconstruction error ``‖ΔW X‖² = tr(ΔW G ΔWᵀ)·T``. Optionally over every ``stride``-th token only, when it
  serves just to measure the error (it costs as much as the layer's own forward).
"""

from __future__ import annotations

import torch


class SquaredNorms:
    """Running mean of ``x²`` per input channel, fp32; with ``with_mean``, of ``x`` too (DSnoT's)."""

    def __init__(self, in_features: int, with_mean: bool = False):
        self.in_features = in_features
        self.with_mean = with_mean
        self.tokens = 0
        self._sum: torch.Tensor | None = None
        self._first: torch.Tensor | None = None

    def update(self, x: torch.Tensor, rows: int = 128) -> None:
        """Add tokens ``x`` of shape ``(..., in_features)``.

        Squares accumulate into a ``(rows, in)`` panel by fused multiply-adds, ``rows`` tokens at a time,
        summed once in ``finalize``: no temporary the size of ``x`` (which costs page faults and memory
        traffic, ~10x the time of this loop on CPU), and every step is contiguous.
        """
        x = x.reshape(-1, self.in_features)  # (t, in)
        if self._sum is None:
            self._sum = torch.zeros(rows, self.in_features, dtype=torch.float32, device=x.device)
            if self.with_mean:
                self._first = torch.zeros_like(self._sum)
        rows = self._sum.shape[0]
        whole = x.shape[0] // rows * rows
        for panel in x[:whole].view(-1, rows, self.in_features):
            panel = panel.float()
            self._sum.addcmul_(panel, panel)
            if self._first is not None:
                self._first.add_(panel)
        tail = x[whole:].float()
        self._sum[: tail.shape[0]].addcmul_(tail, tail)
        if self._first is not None:
            self._first[: tail.shape[0]].add_(tail)
        self.tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """``(in,)`` mean of squares."""
        if self._sum is None or self.tokens == 0:
            raise RuntimeError("SquaredNorms.finalize() before any update()")
        return self._sum.sum(dim=0) / self.tokens

    def mean(self) -> torch.Tensor | None:
        """``(in,)`` mean of ``x`` (``None`` unless ``with_mean``)."""
        return None if self._first is None else self._first.sum(dim=0) / self.tokens


class Gram:
    """Running mean of ``x xᵀ`` over tokens (every ``stride``-th one), in fp32 or fp64, on ``x``'s device."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, stride: int = 1):
        self.in_features = in_features
        self.dtype = dtype
        self.stride = stride
        self.tokens = 0
        self._sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor, chunk: int = 16384) -> None:
        """Add tokens ``x`` of shape ``(..., in_features)``, ``chunk`` tokens at a time to bound temporaries."""
        x = x.reshape(-1, self.in_features)[:: self.stride]
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        for start in range(0, x.shape[0], chunk):
            _add_upper_gram_(self._sum, x[start : start + chunk].to(self.dtype))
        self.tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """The mean Gram matrix ``(in, in)``."""
        if self._sum is None or self.tokens == 0:
            raise RuntimeError("Gram.finalize() before any update()")
        upper = torch.triu(self._sum)
        return (upper + torch.triu(self._sum, diagonal=1).t()) / self.tokens


def _add_upper_gram_(acc: torch.Tensor, x: torch.Tensor, min_split: int = 1024, parts: int = 4) -> None:
    """``acc += xᵀx`` on and above the diagonal only (``finalize`` mirrors it): for wide inputs the row
    panels ``acc[i:i+b, i:]`` skip the blocks below the diagonal, about 40% of the multiply-adds.

    Args:
        acc: ``(in, in)`` accumulator; its strictly-lower part is left undefined.
        x: ``(t, in)`` tokens.
    """
    n = x.shape[1]
    if n < min_split:
        acc.addmm_(x.t(), x)
        return
    b = -(-n // parts)
    for i in range(0, n, b):
        acc[i : i + b, i:].addmm_(x[:, i : i + b].t(), x[:, i:])  # (b, t) @ (t, n - i)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor, rows: int = 1024) -> float:
    """Relative output error ``‖WX − ŴX‖_F / ‖WX‖_F`` on the inputs summarized by Gram matrix ``G``.

    Args:
        W, W_hat: ``(out, in)`` original and compressed weights.
        G: ``(in, in)`` mean of ``x xᵀ`` over the calibration tokens.
        rows: output rows per step (bounds the temporaries to a few ``(rows, in)`` matrices).
    """
    num = den = torch.zeros((), dtype=G.dtype, device=G.device)
    for start in range(0, W.shape[0], rows):
        w = W[start : start + rows].to(G.dtype)  # (rows, in)
        dw = w - W_hat[start : start + rows].to(G.dtype)
        num = num + ((dw @ G) * dw).sum()
        den = den + ((w @ G) * w).sum()
    return float((num.clamp_min(0) / den).sqrt()) if den > 0 else 0.0
