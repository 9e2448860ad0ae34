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
from dataclasses import dataclass

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


# --- The project's own kernels' layouts -------------------------------------------------------------------
#
# Quantized weights are stored as unsigned codes ``u = code - qmin`` (4 bits: 0..15) with, per output row and
# input group, a scale ``s`` and an unsigned zero point ``zu = zero - qmin`` (8 when symmetric), so that
# ``W[r, i] = (u[r, i] - zu[r, g(i)]) * s[r, g(i)]``. Rows are interleaved in tiles of ``TILE`` = 16 (one
# AVX-512 register of fp32 lanes, two AVX2 registers): a tile's 16 rows are read together, each byte holding
# one nibble of each of two inputs of one row, so the kernel multiplies 16 rows by one broadcast input at a
# time and never reduces across lanes. Rows are zero-padded to a multiple of 16.

TILE = 16
# Q4Dense and Q4Sparse24 store scales and zero points in fp16, as GGUF's blocks (issue 25, step 0): 0.5 bit per
# weight at groups of 32 instead of 1. Zero points are integers 0..15, exact; a scale rounds to 11 significant
# bits, so runs that pack fit their grids on fp16 scales (``run.py``) and packing them loses nothing. Layouts
# read from older folders keep their fp32 scales; the kernels take both. Q4InputMajor stores fp16 too (fp32 in
# folders packed before the integer input-major kernel; its fp32-input kernel reads fp32 copies).
PACKED_SCALE_DTYPE = torch.float16
PARTS = ("data", "pos", "scale", "zero")  # the tensors a layout may hold (``pos``: Q4Sparse24 only; ``zero``: asymmetric)


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """``(rows, ...)`` -> ``(ceil(rows/16), ..., 16)``: rows zero-padded, then interleaved tile by tile."""
    rows = t.shape[0]
    pad = -rows % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    t = t.reshape(-1, TILE, *t.shape[1:])
    return t.movedim(1, -1).contiguous()


def _untile(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.movedim(-1, 1).reshape(-1, *t.shape[1:-1])[:rows]


def _unsigned_zero(grid_zero: torch.Tensor | None, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """``zero - qmin`` in tiles, or ``None`` for a symmetric grid (whose unsigned zero is ``2^(bits-1)``)."""
    return None if grid_zero is None else _tiles((grid_zero.float() + (1 << (bits - 1))).to(dtype))


def _zero_or_default(zero: torch.Tensor | None, scale: torch.Tensor, rows: int, repeat: int) -> torch.Tensor:
    z = _untile(zero, rows).float() if zero is not None else torch.full_like(_untile(scale, rows), 8.0, dtype=torch.float32)
    return z.repeat_interleave(repeat, dim=1)


@dataclass
class _GroupedCodes:
    """What a layout of 4-bit codes with per-group scales holds: its packed ``data``, ``scale`` and ``zero``
    (``None`` when symmetric), for weights of ``shape`` ``(out, in)`` in groups of ``group_size`` inputs."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)


class Q4Dense(_GroupedCodes):
    """Dense 4-bit group-quantized weights in 16-row tiles.

    Attributes:
        data: ``(tiles, in/2, 16)`` uint8: byte ``[t, j, r]`` = ``u[16t+r, 2j] | u[16t+r, 2j+1] << 4``.
        scale, zero: ``(tiles, groups, 16)`` fp16 (``PACKED_SCALE_DTYPE``; fp32 in older folders) scales and
            unsigned zero points (``zero`` is ``None`` when symmetric: 8 everywhere).
    """

    @classmethod
    def pack(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> "Q4Dense":
        """From signed 4-bit ``codes`` ``(out, in)`` and a grid's ``scale``/``zero`` ``(out, groups)``."""
        out, n_in = codes.shape
        if n_in % 2 or n_in % group_size:
            raise ValueError(f"Q4Dense needs in_features divisible by 2 and by the group size {group_size}, got {n_in}")
        u = (codes.to(torch.int16) + 8).to(torch.uint8)  # (out, in) 0..15
        data = u[:, 0::2] | (u[:, 1::2] << 4)  # (out, in/2)
        return cls(_tiles(data), _tiles(scale.to(PACKED_SCALE_DTYPE)), _unsigned_zero(zero, 4, PACKED_SCALE_DTYPE),
                   (out, n_in), group_size)

    def unpack(self) -> torch.Tensor:
        """fp32 ``(out, in)`` weights."""
        data = _untile(self.data, self.shape[0])
        u = torch.stack([data & 0xF, data >> 4], dim=-1).reshape(self.shape[0], -1).float()
        zero = _zero_or_default(self.zero, self.scale, self.shape[0], self.group_size)
        return (u - zero) * _untile(self.scale, self.shape[0]).float().repeat_interleave(self.group_size, dim=1)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 rows ``index`` ``(n,)`` of the weights, ``(n, in)``: an embedding lookup in a tied lm_head."""
        tile, lane = index // TILE, index % TILE
        data = self.data[tile, :, lane]  # (n, in/2)
        u = torch.stack([data & 0xF, data >> 4], dim=-1).reshape(len(index), -1).float()
        scale = self.scale[tile, :, lane].float().repeat_interleave(self.group_size, dim=1)
        zero = self.zero[tile, :, lane].float().repeat_interleave(self.group_size, dim=1) if self.zero is not None else 8.0
        return (u - zero) * scale


@dataclass
class Q4Sparse24:
    """2:4-sparse 4-bit group-quantized weights in 16-row tiles: per row and run of 4 inputs, the two kept
    codes and their two positions (2 bits each): 3 bits per input instead of 4.

    Attributes:
        data: ``(tiles, in/4, 16)`` uint8: the two kept codes of run ``k`` of row ``16t+r``, first in the low
            nibble (the smaller position first; a run with fewer than two non-zeros keeps zeros).
        pos: ``(tiles, in/8, 16)`` uint8: byte ``[t, j, r]`` = positions of runs ``2j`` (low nibble) and
            ``2j+1`` (high nibble), each nibble ``p0 | p1 << 2`` with ``p0 < p1`` in 0..3.
        scale, zero: ``(tiles, groups, 16)`` fp16 (or fp32), as in ``Q4Dense``.
    """

    data: torch.Tensor
    pos: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]
    group_size: int

    @classmethod
    def pack(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> "Q4Sparse24":
        """From signed 4-bit ``codes`` ``(out, in)`` whose dequantized weights are 2:4 sparse."""
        out, n_in = codes.shape
        if n_in % 8 or n_in % group_size or group_size % 4:
            raise ValueError(f"Q4Sparse24 needs in_features divisible by 8 and the group size {group_size} "
                             f"(itself divisible by 4), got {n_in}")
        zu = (zero.float() + 8 if zero is not None else torch.full_like(scale, 8.0)).repeat_interleave(group_size, dim=1)
        u = codes.to(torch.int16) + 8  # (out, in) 0..15
        nonzero = (u.float() != zu).reshape(out, -1, 4)  # (out, runs, 4)
        if int(nonzero.sum(-1).max()) > 2:
            raise ValueError("Q4Sparse24 needs at most 2 non-zero weights in every 4 consecutive inputs")
        # the two kept positions of every run: non-zeros first (stable), padded with zero-valued positions
        order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :2]  # (out, runs, 2)
        p0, p1 = order.min(-1).values, order.max(-1).values
        runs = u.reshape(out, -1, 4)
        u0, u1 = runs.gather(-1, p0[..., None])[..., 0], runs.gather(-1, p1[..., None])[..., 0]
        data = (u0 | (u1 << 4)).to(torch.uint8)  # (out, runs)
        code = (p0 | (p1 << 2)).to(torch.uint8)  # (out, runs) 4 bits
        pos = code[:, 0::2] | (code[:, 1::2] << 4)  # (out, runs/2)
        return cls(_tiles(data), _tiles(pos), _tiles(scale.to(PACKED_SCALE_DTYPE)), _unsigned_zero(zero, 4, PACKED_SCALE_DTYPE),
                   (out, n_in), group_size)

    def unpack(self) -> torch.Tensor:
        """fp32 ``(out, in)`` weights (pruned positions exactly zero)."""
        out, n_in = self.shape
        data, pos = _untile(self.data, out), _untile(self.pos, out)
        code = torch.stack([pos & 0xF, pos >> 4], dim=-1).reshape(out, -1).long()  # (out, runs)
        p0, p1 = code & 3, code >> 2
        zu = _zero_or_default(self.zero, self.scale, out, self.group_size // 4)  # (out, runs)
        s = _untile(self.scale, out).float().repeat_interleave(self.group_size, dim=1)
        runs = zu[..., None].repeat(1, 1, 4)  # unkept positions decode to exactly 0
        runs.scatter_(-1, p0[..., None], (data & 0xF).float()[..., None])
        runs.scatter_(-1, p1[..., None], (data >> 4).float()[..., None])
        return (runs - zu[..., None]).reshape(out, n_in) * s

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.pos, self.scale, self.zero) if t is not None)


IM_BLOCK = 8  # tiles (128 outputs, one 64-byte cache line of an input's codes) per block of Q4InputMajor


class Q4InputMajor(_GroupedCodes):
    """4-bit group-quantized weights stored input by input, for activation sparsity: the kernel does not read
    the codes of an input that is zero. Outputs are cut into blocks of 128 (8 tiles of 16); inside a block,
    each input's codes for those outputs are one 64-byte run (one cache line), and the inputs' runs follow one
    another, so a block is read as one stream with the zeroed inputs' lines left out. Groups run along the
    inputs as in ``Q4Dense`` (the scale is applied per group after its inputs are summed, so skipping some of
    a group's inputs is exact).

    Attributes:
        data: ``(in · tiles · 8,)`` uint8; tile ``t`` of input ``i`` (its 16 outputs ``16t .. 16t+15``, padded
            with zeros past ``out``) is 8 bytes, byte ``k`` = ``u[16t+k, i] | u[16t+8+k, i] << 4``, at
            ``8·(in·t0 + i·n + t - t0)`` where ``t0 = 8·(t // 8)`` starts its block and ``n`` is the
            block's tile count (8, or fewer in the last block).
        scale, zero: ``(groups, tiles·16)`` fp16 (``PACKED_SCALE_DTYPE``; fp32 in older folders) scales and
            unsigned zero points per input group and output (``zero`` is ``None`` when symmetric: 8 everywhere).
    """

    @classmethod
    def pack(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> "Q4InputMajor":
        """From signed 4-bit ``codes`` ``(out, in)`` and a grid's ``scale``/``zero`` ``(out, groups)``."""
        out, n_in = codes.shape
        if n_in % group_size:
            raise ValueError(f"Q4InputMajor needs in_features divisible by the group size {group_size}, got {n_in}")
        pad = -out % TILE
        u = torch.nn.functional.pad((codes.to(torch.int16) + 8).to(torch.uint8), (0, 0, 0, pad))  # (out+pad, in)
        halves = u.t().reshape(n_in, -1, 2, 8)  # (in, tiles, half, k): output 16t + 8·half + k
        tiles = halves[:, :, 0] | (halves[:, :, 1] << 4)  # (in, tiles, 8)
        data = torch.cat([block.reshape(-1) for block in tiles.split(IM_BLOCK, dim=1)])

        def columns(t: torch.Tensor) -> torch.Tensor:  # (out, groups) -> (groups, out+pad)
            return torch.nn.functional.pad(t.float().t(), (0, pad)).to(PACKED_SCALE_DTYPE).contiguous()

        zu = None if zero is None else columns(zero.float() + 8)
        return cls(data, columns(scale), zu, (out, n_in), group_size)

    def unpack(self) -> torch.Tensor:
        """fp32 ``(out, in)`` weights."""
        out, n_in = self.shape
        n_tiles = self.scale.shape[1] // TILE
        sizes = [min(IM_BLOCK, n_tiles - t0) for t0 in range(0, n_tiles, IM_BLOCK)]
        blocks = self.data.split([n_in * n * 8 for n in sizes])
        tiles = torch.cat([b.reshape(n_in, n, 8) for b, n in zip(blocks, sizes)], dim=1)  # (in, tiles, 8)
        u = torch.stack([tiles & 0xF, tiles >> 4], dim=2).reshape(n_in, -1)[:, :out].t().float()  # (out, in)
        zero = self.zero[:, :out].t().float() if self.zero is not None else torch.full((out, self.scale.shape[0]), 8.0)
        scale = self.scale[:, :out].t().float()
        return (u - zero.repeat_interleave(self.group_size, dim=1)) * scale.repeat_interleave(self.group_size, dim=1)
