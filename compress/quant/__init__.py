"""Group quantization of weights and its registry: the integer grid (``grid``), round to nearest (``rtn``)
and GPTQ (``gptq``). ``--quant-method`` is checked against ``METHODS``; adding a method is a module
with a ``quantize`` function and one line here.

A method maps ``(W, stats, cfg, keep=, scale_dtype=) -> (W_hat, grid)``: ``W_hat`` on ``grid``, zeros kept
where ``keep`` is False. Codes, scales and zero points are plain tensors; how they are stored on disk is
``export``'s business and how they are packed for our kernels is ``kernels.formats``'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from compress.quant import gptq, rtn
from compress.quant.grid import QuantGrid


@dataclass(frozen=True)
class QuantMethod:
    """A quantization method: ``needs_hessian``: it reads the full input Gram matrix; ``joint_with``: the
    pruning method it runs one pass with (its OBS loop prunes and quantizes each column as it is frozen), by
    ``joint(W, stats, cfg, prune_cfg, scale_dtype=) -> (W_hat, grid)``."""

    name: str
    quantize: Callable
    needs_hessian: bool
    summary: str
    joint_with: str | None = None
    joint: Callable | None = None


def _gptq(W, stats, cfg, *, keep=None, scale_dtype=None):
    result, grid = gptq.quantize(W, stats, cfg, keep=keep, scale_dtype=scale_dtype)
    return result.W, grid


def _gptq_joint(W, stats, cfg, prune, *, scale_dtype=None):
    result, grid = gptq.quantize(W, stats, cfg, pattern=prune.pattern, blocksize=prune.blocksize,
                                 dampening=prune.dampening, scale_dtype=scale_dtype)
    return result.W, grid


METHODS: dict[str, QuantMethod] = {
    "rtn": QuantMethod("rtn", rtn.quantize, False, "round to nearest"),
    "gptq": QuantMethod("gptq", _gptq, True, "error-compensating, on the calibration Hessian", joint_with="sparsegpt",
                        joint=_gptq_joint),
}


def get(name: str) -> QuantMethod:
    """Raises ValueError naming the choices for an unknown method."""
    if name not in METHODS:
        raise ValueError(f"--quant-method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "QuantGrid", "QuantMethod", "get"]
