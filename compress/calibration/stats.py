"""Statistics accumulators over calibration inputs: ``init``, ``update(x)``, ``finalize()``.

Every compression method here is fed the same statistic, the input Gram matrix ``G = mean_t x_t x_tᵀ``
(fp32): its diagonal is Wanda's squared column norm (up to the token count), it is SparseGPT's and GPTQ's
Hessian (up to a factor 2), and it gives the exact reconstruction error ``‖ΔW X‖² = tr(ΔW G ΔWᵀ)·T``.
"""

from __future__ import annotations

import torch


class Gram:
    """Running mean of ``x xᵀ`` over tokens, in fp32 (or fp64 if asked), on ``x``'s device."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32):
        self.in_features = in_features
        self.dtype = dtype
        self.tokens = 0
        self._sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor, chunk: int = 16384) -> None:
        """Add tokens ``x`` of shape ``(..., in_features)``, ``chunk`` tokens at a time to bound temporaries."""
        x = x.reshape(-1, self.in_features)
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk].to(self.dtype)  # (t, in)
            self._sum.addmm_(xc.t(), xc)
        self.tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """The mean Gram matrix ``(in, in)``."""
        if self._sum is None or self.tokens == 0:
            raise RuntimeError("Gram.finalize() before any update()")
        return self._sum / self.tokens


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    """Relative output error ``‖WX − ŴX‖_F / ‖WX‖_F`` on the inputs summarized by Gram matrix ``G``.

    Args:
        W, W_hat: ``(out, in)`` original and compressed weights.
        G: ``(in, in)`` mean of ``x xᵀ`` over the calibration tokens.
    """
    W = W.to(G.dtype)
    dW = W - W_hat.to(G.dtype)  # (out, in)
    num = ((dW @ G) * dW).sum().clamp_min(0)
    den = ((W @ G) * W).sum()
    return float((num / den).sqrt()) if den > 0 else 0.0
