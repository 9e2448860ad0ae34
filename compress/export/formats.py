"""The output formats compress writes, what each can hold (checked before any work), and their bytes."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from compress.outputs import OutputError, is_file_output

FORMATS = ("dense", "compressed-tensors", "packed", "gguf")
CT_GROUP_SIZES = (32, 64, 128)  # what vLLM's compressed-tensors W4A16/W8A16 kernels take (or per channel)
CT_BITS = (4, 8)


def check_format(fmt: str, recipe, out: Path | None = None, gguf_dtype: str = "f16") -> None:
    """Refuse, before any work, an output format that cannot hold ``recipe`` (a ``config.Recipe``) or does not
    fit ``out`` (a ``.gguf`` file for ``gguf``, a folder for the others); what needs the model is
    ``check_layers``' (and ``gguf.check_model``'s).

    Raises:
        OutputError: naming the value and the fix.
    """
    if fmt not in FORMATS:
        raise OutputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if out is not None and is_file_output(out) != (fmt == "gguf"):
        raise OutputError(f"--out {str(out)!r} with --format {fmt}: a GGUF is one file, use --format gguf with an "
                          f"--out ending in .gguf (and a folder for the other formats)")
    if fmt == "gguf":
        from compress.export import gguf

        gguf.check_recipe(recipe, gguf_dtype)
        return
    if recipe.quant_lm_head and fmt == "compressed-tensors":
        raise OutputError("--quant-lm-head is not written in the compressed-tensors format yet: use --format packed or dense")
    if fmt == "packed":
        quant = recipe.quant
        if quant is None or quant.bits != 4:
            raise OutputError("--format packed stores 4-bit group-quantized weights for compress's kernels: add "
                              "--quant w4g128 (or w4g64), or use --format dense")
        if quant.group_size and quant.group_size % 8:
            raise OutputError(f"--format packed: the kernels take group sizes divisible by 8, not "
                              f"{quant.group_size}: use --quant w4g64 or w4g128")
        return
    if fmt != "compressed-tensors":
        return
    quant = recipe.quant
    if quant is None:
        raise OutputError("--format compressed-tensors stores quantized weights (vLLM dropped sparse formats): "
                          "add --quant w4g128 (or w8), or use --format dense")
    if quant.bits not in CT_BITS:
        raise OutputError(f"--format compressed-tensors: vLLM loads 4 or 8-bit weights, not {quant.bits}: "
                          f"use --quant w4g{quant.group_size or 128} or --format dense")
    if quant.group_size and quant.group_size not in CT_GROUP_SIZES:
        raise OutputError(f"--format compressed-tensors: vLLM takes group sizes {CT_GROUP_SIZES} or per channel, "
                          f"not {quant.group_size}: use --quant w{quant.bits}g64, or --format dense")


def check_layers(fmt: str, recipe, model) -> None:
    """Refuse (once the model is loaded, before calibration) compressed-tensors for a model with other linears
    than ``nn.Linear`` (GPT-2's Conv1D) that the recipe compresses: vLLM's loader maps nn.Linear layers.
    (Packed layouts hold any linear's ``(out, in)`` codes.)

    Raises:
        OutputError: naming the layer and the fix.
    """
    if fmt != "compressed-tensors":
        return
    from compress import models

    prefix, blocks = models.decoder_blocks(model)
    for i, block in enumerate(blocks):
        for name, module in models.linears(block).items():
            full = f"{prefix}.{i}.{name}"
            if not isinstance(module, torch.nn.Linear) and not models.is_ignored(full, recipe.ignore):
                raise OutputError(f"--format {fmt} needs nn.Linear layers; {full} is "
                                  f"{type(module).__name__}: use --format dense")


def storage_bytes(report, fmt: str, dtype: torch.dtype, symmetric: bool = True, sparse24: bool = False) -> dict:
    """Bytes the compressed linears take in ``fmt`` vs the same linears dense in ``dtype`` (the model's);
    ``symmetric``: quantized without zero points; ``sparse24``: 2:4-pruned (``packed`` stores them as
    ``Q4Sparse24``, but for linears with activation thresholds, which are ``Q4InputMajor``: 4 bits a weight)."""
    from compress.kernels.formats import PACKED_SCALE_DTYPE, TILE

    size = torch.finfo(dtype).bits // 8
    dense = stored = 0
    for layer in report.layers:
        n_out, n_in = layer.shape
        dense += n_out * n_in * size
        if layer.bits is None or fmt == "dense":
            stored += n_out * n_in * (2 if fmt == "gguf" else size)  # gguf: --gguf-dtype's default f16
            continue
        if fmt == "gguf":  # 32-weight blocks: Q4_0 18 bytes, Q4_1 20, Q8_0 34
            stored += n_out * n_in // 32 * (34 if layer.bits == 8 else 18 if symmetric else 20)
            continue
        groups = n_in // layer.group_size
        if fmt == "packed":  # kernels.formats: 16-row tiles, fp16 scales and unsigned zero points
            rows = -(-n_out // TILE) * TILE
            codes = rows * n_in * (3 if sparse24 and not layer.act_target else 4) // 8
            stored += codes + rows * groups * PACKED_SCALE_DTYPE.itemsize * (1 if symmetric else 2)
            continue
        stored += n_out * math.ceil(n_in * layer.bits / 32) * 4 + n_out * groups * size + 2 * 8
        if not symmetric:
            stored += math.ceil(n_out * layer.bits / 32) * groups * 4
    return {"format": fmt, "linears_dense": dense, "linears_stored": stored, "ratio": stored / dense if dense else 1.0}
