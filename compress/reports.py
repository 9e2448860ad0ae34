"""What a compression run reports, and the state it resumes from: plain data both the pipeline, which makes
them, and the exports, which write them, import."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from compress.quant.grid import QuantGrid


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float
    rel_error: float  # ‖WX − ŴX‖/‖WX‖ on `error_tokens` calibration tokens
    error_tokens: int
    seconds: float
    bits: int | None = None  # quantized to this many bits, None if not quantized
    group_size: int | None = None
    act_target: float | None = None  # target fraction of zeroed input activations, None if not targeted
    act_sparsity: float | None = None  # achieved on the calibration inputs
    tokens: int | None = None  # calibration tokens that reached it (an expert: those the router sent it)
    data_free: bool = False  # too few tokens: compressed without data (identity statistics)


class QuantizedWeight:
    """Integer form of a quantized linear, for compressed exports: ``W = grid.decode(codes)``.

    Codes of at most 4 bits are held two to a byte (``codes`` unpacks them): a streamed run holds a block's
    codes until the block is written, and an MoE block's experts hold hundreds of millions of them."""

    def __init__(self, codes: torch.Tensor, grid: QuantGrid):
        self.grid = grid
        self.shape = tuple(codes.shape)  # (out, in)
        self._held = pack_nibbles(codes) if grid.bits <= 4 else codes

    @property
    def codes(self) -> torch.Tensor:
        """``(out, in)`` int8 codes in ``[grid.qmin, grid.qmax]``."""
        return unpack_nibbles(self._held, self.shape[1]) if self.grid.bits <= 4 else self._held

    @property
    def held_bytes(self) -> int:
        return self._held.numel() * self._held.element_size()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` int8 codes in [-8, 7] -> ``(rows, ceil(cols / 2))`` uint8: column ``2j`` in the low
    nibble of byte ``j``, ``2j + 1`` in its high one."""
    low_bits = codes.to(torch.uint8) & 0xF  # (rows, cols): two's complement, 4 bits
    if low_bits.shape[1] % 2:
        low_bits = torch.nn.functional.pad(low_bits, (0, 1))
    return low_bits[:, 0::2] | (low_bits[:, 1::2] << 4)


def unpack_nibbles(held: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: ``(rows, cols)`` int8."""
    pairs = torch.stack((held & 0xF, held >> 4), dim=-1).reshape(held.shape[0], -1)[:, :cols]  # (rows, cols) in [0, 16)
    return (pairs.to(torch.int8) ^ 8) - 8  # sign-extend the 4-bit two's complement


@dataclass
class BlockReport:
    index: int
    seconds: float
    layers: list[LayerReport]

    @property
    def mean_error(self) -> float:
        return sum(layer.rel_error for layer in self.layers) / max(len(self.layers), 1)


@dataclass
class Report:
    recipe: str
    seconds: float = 0.0
    blocks: list[BlockReport] = field(default_factory=list)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict, repr=False)  # by full linear name
    # by full linear name: (in,), or (bands, in) with position bands starting at act_edges
    act_thresholds: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    act_edges: tuple[int, ...] = ()
    gate_space: dict[str, str] = field(default_factory=dict)  # CHESS: down projection -> its up projection

    @property
    def layers(self) -> list[LayerReport]:
        return [layer for block in self.blocks for layer in block.layers]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all compressed linears' weights."""
        return weighted_sparsity(self.layers)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "seconds": self.seconds, "sparsity": self.sparsity,
                "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The report as compression.json records it (its layers in one block: blocks are not recorded)."""
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in data["layers"]]
        return cls(data["recipe"], data["seconds"], [BlockReport(0, data["seconds"], layers)])


@dataclass
class BlockState:
    """Everything a run needs to continue at ``next_block``: that block's input hidden states (one tensor per
    calibration chunk) and the report so far. ``BlockIO.done`` receives it after every block."""

    next_block: int
    hidden: list[torch.Tensor]
    blocks: list[BlockReport]
    act_thresholds: dict[str, torch.Tensor]
    gate_space: dict[str, str]

    def to_parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """A JSON-able dict and a dict of tensors (for safetensors)."""
        meta = {"next_block": self.next_block, "chunks": len(self.hidden), "gate_space": self.gate_space,
                "blocks": [{"index": b.index, "seconds": b.seconds, "layers": [asdict(r) for r in b.layers]} for b in self.blocks]}
        tensors = {f"hidden.{c}": h.contiguous() for c, h in enumerate(self.hidden)}
        tensors.update({f"act.{name}": t.contiguous() for name, t in self.act_thresholds.items()})
        return meta, tensors

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "BlockState":
        blocks = [BlockReport(b["index"], b["seconds"], [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in b["layers"]])
                  for b in meta["blocks"]]
        return cls(meta["next_block"], [tensors[f"hidden.{c}"] for c in range(meta["chunks"])], blocks,
                   {n[len("act."):]: t for n, t in tensors.items() if n.startswith("act.")}, meta["gate_space"])


def weighted_sparsity(layers: list[LayerReport]) -> float:
    """Fraction of zeros over the weights of ``layers`` (each counted by its size)."""
    total = sum(r.shape[0] * r.shape[1] for r in layers)
    return sum(r.sparsity * r.shape[0] * r.shape[1] for r in layers) / max(total, 1)


def kind_table(layers: list[LayerReport]) -> list[str]:
    """One row per kind of linear (q_proj, down_proj, ...) over all blocks, then the totals: the lines printed."""
    kinds: dict[str, list[LayerReport]] = {}
    for layer in layers:
        kinds.setdefault(re.sub(r"^.*?\.\d+\.", "", layer.name), []).append(layer)
    lines = [f"{'linear':<24}{'count':>6}{'sparsity':>10}{'bits':>6}{'act.sparsity':>13}{'rel.error':>11}"
             f"{'worst':>9}{'seconds':>9}"]
    for kind, group in [*kinds.items(), ("all", layers)]:
        error = sum(r.rel_error for r in group) / len(group)
        bits = {r.bits for r in group}
        bits_text = "-" if bits == {None} else "/".join(str(b) for b in sorted(b for b in bits if b))
        acts = [r.act_sparsity for r in group if r.act_sparsity is not None]
        act_text = f"{sum(acts) / len(acts):.4f}" if acts else "-"
        lines.append(f"{kind:<24}{len(group):>6}{weighted_sparsity(group):>10.4f}{bits_text:>6}{act_text:>13}"
                     f"{error:>11.4f}{max(r.rel_error for r in group):>9.4f}{sum(r.seconds for r in group):>9.1f}")
    return lines
