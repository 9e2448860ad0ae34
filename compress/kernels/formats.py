"""Storage layouts of compressed weights. The only module that knows how bits are laid out.

``pack_int32``: signed ``b``-bit codes packed densely into int32 words along one dimension, the layout of
the compressed-tensors ``pack-quantized`` format (vLLM's): codes are offset to unsigned (``q + 2^(b-1)``),
every run of 32 consecutive codes fills exactly ``b`` words, code ``i`` of a run occupying bits
``i·b .. i·b + b - 1`` of the run counted from the least significant bit of its first word (so a code may
straddle two words when ``b`` does not divide 32). A partial last run is zero-padded and only the words
it needs are kept: ``ceil(n·b / 32)`` words for ``n`` codes.
"""

from __future__ import annotations

import math

import torch


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing takes 1..8 bits per code, got {bits}")


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``bits``-bit ``codes`` ``(rows, cols)`` (int8) along ``dim`` into int32 words.

    Returns:
        ``(rows, ceil(cols·bits/32))`` int32 for ``dim=1``; ``(ceil(rows·bits/32), cols)`` for ``dim=0``.
    """
    _check_bits(bits)
    if dim == 0:
        return pack_int32(codes.t(), bits, 1).t().contiguous()
    rows, cols = codes.shape
    runs = math.ceil(cols / 32)
    unsigned = codes.to(torch.int64) + (1 << (bits - 1))  # (rows, cols) in [0, 2^bits)
    unsigned = torch.nn.functional.pad(unsigned, (0, runs * 32 - cols))  # (rows, runs*32)
    shifts = torch.arange(bits, device=codes.device)
    stream = (unsigned.reshape(rows, runs, 32, 1) >> shifts) & 1  # (rows, runs, 32, bits): bit j of code i
    words = stream.reshape(rows, runs, bits, 32) << torch.arange(32, device=codes.device)  # bit i*b+j of the run
    packed = words.sum(-1).reshape(rows, runs * bits)  # (rows, runs*bits) in [0, 2^32)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # two's complement int32
    return packed[:, : math.ceil(cols * bits / 32)].to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of ``pack_int32``: int8 codes of ``shape`` ``(rows, cols)``."""
    _check_bits(bits)
    if dim == 0:
        return unpack_int32(packed.t(), bits, (shape[1], shape[0]), 1).t().contiguous()
    rows, cols = shape
    runs = math.ceil(cols / 32)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (rows, words) unsigned
    words = torch.nn.functional.pad(words, (0, runs * bits - words.shape[1]))  # (rows, runs*bits)
    stream = (words.reshape(rows, runs, bits, 1) >> torch.arange(32, device=packed.device)) & 1  # (rows, runs, bits, 32)
    codes = (stream.reshape(rows, runs, 32, bits) << torch.arange(bits, device=packed.device)).sum(-1)
    return (codes.reshape(rows, runs * 32)[:, :cols] - (1 << (bits - 1))).to(torch.int8)
