"""What happens to one linear's weight matrix under a recipe: prune, quantize, or both.

- prune only: the method's ``apply``.
- quantize only: round to nearest (``rtn``) or GPTQ.
- SparseGPT + GPTQ: one OBS pass that prunes and quantizes each column as it is frozen (SparseGPT paper,
  section 3.5), so the rounding error of kept weights is compensated too.
- any other pruning + quantization: prune first, then quantize the kept weights (GPTQ with the mask fixed,
  or RTN); pruned weights stay exactly zero because zero is on every grid.
- ``--refine dsnot|swap`` refines the pruned matrix's mask right after pruning, before any quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress import quant as quant_methods
from compress.config import Recipe
from compress.pruning import InputStats, dsnot, get, swap
from compress.quant.grid import QuantGrid


@dataclass
class Compressed:
    """A compressed weight matrix: ``W`` ``(out, in)`` fp32 as the model will compute with it, and, when
    quantized, its grid and integer codes ``(out, in)`` int8 (``grid.decode(codes) == W``)."""

    W: torch.Tensor
    grid: QuantGrid | None = None
    codes: torch.Tensor | None = None


def needs_hessian(recipe: Recipe) -> bool:
    """Whether the recipe's methods need the full Gram matrix (not a token subsample of it)."""
    return bool((recipe.prune and (get(recipe.prune.method).needs_hessian or recipe.prune.refine))
                or (recipe.quant and quant_methods.get(recipe.quant.method).needs_hessian))


def needs_norms(recipe: Recipe) -> bool:
    """Whether the recipe's methods read the inputs' mean squares (Wanda's score, DSnoT's)."""
    return bool(recipe.prune and (get(recipe.prune.method).uses_norms or recipe.prune.refine == "dsnot"))


def _prune(W: torch.Tensor, stats: InputStats, recipe: Recipe) -> torch.Tensor:
    prune = recipe.prune
    method = get(prune.method)
    W_hat = method.apply(W, stats, prune)
    if prune.refine == "dsnot":
        if stats.mean is None:
            raise ValueError("DSnoT needs the inputs' channel means: collect them (SquaredNorms(with_mean=True))")
        W_hat = dsnot.refine(W, W_hat, stats.G, stats.mean, stats.sq, prune.pattern, prune.refine_cycles,
                             prune.refine_var_power, fit=method.updates_weights)
    elif prune.refine == "swap":
        W_hat = swap.refine(W, W_hat, stats.G, prune.pattern, prune.refine_cycles)
    return W_hat


def compress_weight(W: torch.Tensor, stats: InputStats, recipe: Recipe, scale_dtype: torch.dtype = torch.float32) -> Compressed:
    """Apply ``recipe`` to ``W`` ``(out, in)`` fp32 given its input statistics; ``scale_dtype`` is the model's."""
    prune, quant = recipe.prune, recipe.quant
    if prune is None and quant is None:  # activation sparsity only: weights stay
        return Compressed(W)
    if quant is None:
        return Compressed(_prune(W, stats, recipe))
    method = quant_methods.get(quant.method)
    if prune is not None and prune.method == method.joint_with:  # one OBS pass prunes and quantizes
        W_hat, grid = method.joint(W, stats, quant, prune, scale_dtype=scale_dtype)
        return Compressed(W_hat, grid, grid.encode(W_hat))
    keep = None
    if prune is not None:
        W = _prune(W, stats, recipe)
        keep = W != 0
    W_hat, grid = method.quantize(W, stats, quant, keep=keep, scale_dtype=scale_dtype)
    return Compressed(W_hat, grid, grid.encode(W_hat))
