"""Statistics accumulators over calibration inputs: ``init``, ``update(x)``, ``finalize()``.

Two statistics of a linear's input, both fp32 running means over tokens:
- ``SquaredNorms``: ``mean_t x_t²`` per input channel, Wanda's (squared, scaled) column norm; cheap.
- ``Gram``: ``G = mean_t x_t x_tᵀ``, SparseGPT's and GPTQ's Hessian (up to a factor 2), and the exact
  reconstruction error ``‖ΔW X‖² = tr(ΔW G ΔWᵀ)·T``. Optionally over every ``stride``-th token only, when it
  serves just to measure the error (it costs as much as the layer's own forward).

The Gram matrix's products can be taken in bf16 (``products="bf16"``): inputs rounded to bf16, products summed
in fp32 by the CPU's matrix unit (AMX), 3-4x faster than fp32 products. That moves G by 1e-5 to 7e-4 of ‖G‖
(Frobenius) on SmolLM2-135M's linear inputs, 60 to 10,000 times less than the calibration sample itself does
(G over two halves of 128 x 512 tokens: 3-21% apart; ``benchmarks/gram_precision.py``), and not at all for a
bf16 model, whose inputs are bf16 already. ``resolve_precision("auto", device)`` picks bf16 where it is fast
(a CPU with AMX), fp32 elsewhere.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from compress.config import PRECISIONS


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


def resolve_precision(choice: str, device: torch.device | str, option: str = "--gram-precision") -> str:
    """``fp32`` or ``bf16`` for ``option``'s ``PRECISIONS`` choice: ``auto`` is bf16 on a CPU with AMX, fp32
    elsewhere (CUDA, or CPUs without a bf16 matrix unit, where bf16 products would be no faster)."""
    if choice not in PRECISIONS:
        raise ValueError(f"{option} {choice!r} is not one of {', '.join(PRECISIONS)}")
    if choice != "auto":
        return choice
    return "bf16" if torch.device(device).type == "cpu" and _cpu_has_amx() and _bf16_switch() is not None else "fp32"


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _bf16_switch():
    """oneDNN's fp32-matmul precision setting (torch >= 2.9), or ``None`` without one."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return matmul if matmul is not None and hasattr(matmul, "fp32_precision") else None


@contextmanager
def _bf16_products() -> Iterator[None]:
    """Inside, fp32 matmuls on CPU round their inputs to bf16 and accumulate in fp32 (oneDNN). The setting is
    process-wide: only the pipeline's one running worker multiplies meanwhile."""
    switch = _bf16_switch()
    if switch is None:
        yield
        return
    previous = switch.fp32_precision
    switch.fp32_precision = "bf16"
    try:
        yield
    finally:
        switch.fp32_precision = previous


class Gram:
    """Running mean of ``x xᵀ`` over tokens (every ``stride``-th one), in fp32 or fp64, on ``x``'s device;
    ``products`` ``fp32`` or ``bf16`` (module docstring)."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, stride: int = 1, products: str = "fp32"):
        if products not in ("fp32", "bf16"):
            raise ValueError(f"Gram products {products!r}: resolve it first (fp32 or bf16)")
        self.in_features = in_features
        self.dtype = dtype
        self.stride = stride
        self.products = products if dtype == torch.float32 else "fp32"
        self.tokens = 0
        self._sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor, chunk: int = 16384) -> None:
        """Add tokens ``x`` of shape ``(..., in_features)``, ``chunk`` tokens at a time to bound temporaries."""
        x = x.reshape(-1, self.in_features)[:: self.stride]
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        bf16 = self.products == "bf16" and x.device.type == "cpu"
        with _bf16_products() if bf16 else nullcontext():
            for start in range(0, x.shape[0], chunk):
                # bf16 products are fast enough that splitting narrow inputs costs more than it saves (measured)
                _add_upper_gram_(self._sum, x[start : start + chunk].to(self.dtype), min_split=1024 if bf16 else 512)
        self.tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """The mean Gram matrix ``(in, in)``."""
        if self._sum is None or self.tokens == 0:
            raise RuntimeError("Gram.finalize() before any update()")
        upper = torch.triu(self._sum)
        return (upper + torch.triu(self._sum, diagonal=1).t()) / self.tokens


def _add_upper_gram_(acc: torch.Tensor, x: torch.Tensor, min_split: int = 512, parts: int = 4) -> None:
    """``acc += xᵀx`` on and above the diagonal only (``finalize`` mirrors it): for inputs of at least
    ``min_split`` features the row panels ``acc[i:i+b, i:]`` skip the blocks below the diagonal, 37.5% of the
    multiply-adds (on 2 cores: 5.3 vs 7.8 ms for 4096 tokens x 576 features, 40 vs 58 ms for 1536).

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
