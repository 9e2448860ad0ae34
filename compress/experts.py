"""Mixture-of-experts blocks seen as linears (issue 26).

transformers 5 stores a block's experts as fused 3-D parameters (``experts.gate_up_proj`` ``(E, 2I, H)``,
``experts.down_proj`` ``(E, H, I)``; gpt-oss transposed, its gate and up rows interleaved, with biases), which
no linear-by-linear method sees. ``unfuse_experts`` replaces each such module by ``ExpertLinears``: one
``nn.Linear`` per expert and matrix (``experts.3.gate_proj``, ``.up_proj``, ``.down_proj``, vLLM's per-expert
names), whose forward is the fused module's routed loop, so each expert's linears are called with exactly the
tokens the router sends it (the calibration statistics are routed ones for free), and whose ``state_dict``
and ``load_state_dict`` speak the fused names and shapes: checkpoints stream in, and exports come out, in the
model's own layout. The layout is read from the flags transformers' ``use_experts_implementation`` puts on
the module (``is_transposed``, ``is_concatenated``, ``has_bias``), and the activation is the module's own
``_apply_gate``, so gpt-oss' clamped SwiGLU is the one it was trained with.

``calibrate_all`` (``--moe-calibration all``): every expert's linears see every token (the block's output
still takes each token's top-k experts only), for experts the router seldom picks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

MATRICES = ("gate_proj", "up_proj", "down_proj")
CALIBRATIONS = ("routed", "all")


@dataclass(frozen=True)
class MoeOptions:
    """How experts are calibrated: on the tokens the router sends each (``routed``) or on every token
    (``all``; the block's output still takes each token's top-k); an expert linear that received fewer than
    ``min_tokens`` tokens is compressed without data (identity statistics: magnitude pruning, RTN)."""

    calibration: str = "routed"
    min_tokens: int = 16

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"--moe-calibration {self.calibration!r} is not one of {', '.join(CALIBRATIONS)}")
        if self.min_tokens < 1:
            raise ValueError(f"--moe-min-tokens {self.min_tokens} must be at least 1")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module this file can present as linears: 3-D ``gate_up_proj`` and
    ``down_proj`` and the layout flags of ``use_experts_implementation`` (no post-expert norm)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "is_transposed") and getattr(module, "has_gate", True)
            and not getattr(module, "has_post_expert_norm", False))


class Expert(nn.Module):
    """One expert's three matrices as linears (weights ``(out, in)``)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, device, dtype):
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj, self.up_proj = nn.Linear(hidden, intermediate, **kw), nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE block as ``Expert`` modules ``0 .. E-1``, computing what ``fused`` computed."""

    def __init__(self, fused: nn.Module):
        E, a, b = fused.gate_up_proj.shape
        self.transposed, self.concatenated = bool(fused.is_transposed), bool(getattr(fused, "is_concatenated", True))
        self.has_bias = bool(getattr(fused, "has_bias", False))
        hidden, two_i = (a, b) if self.transposed else (b, a)
        # on the meta device: unfuse_experts gives every linear its tensor (views of the fused ones)
        super().__init__([Expert(hidden, two_i // 2, self.has_bias, "meta", fused.gate_up_proj.dtype) for _ in range(E)])
        self.num_experts = E
        self._apply_gate = fused._apply_gate  # the model's own activation (the bound method keeps the module)
        self._order = [n for n, _ in fused.named_parameters(recurse=False)]  # the checkpoint's order of them
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            if isinstance(getattr(fused, name, None), nn.Parameter):
                setattr(fused, name, None)  # the fused module keeps only what _apply_gate reads
        self.calibrate_all = False  # every expert computes every token (its output still routed)
        self.visit_all = False  # every expert is called, with no tokens if routed none (calibration hooks fire)
        self.fused_names = True  # state_dict in the fused layout (per_expert_names: one entry per expert linear)
        self._register_state_dict_hook(_fused_state_dict)

    # ------------------------------------------------------------------ the fused layout <-> per-expert linears
    def split(self, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fused tensors (``gate_up_proj``, ``down_proj``[, biases]) -> per-expert ``"{e}.{matrix}.{weight|bias}"``
        (views, no copies)."""
        gate_up = fused["gate_up_proj"].transpose(1, 2) if self.transposed else fused["gate_up_proj"]  # (E, 2I, H)
        down = fused["down_proj"].transpose(1, 2) if self.transposed else fused["down_proj"]  # (E, H, I)
        gate, up = self._halves(gate_up)
        out = {}
        for e in range(self.num_experts):
            out |= {f"{e}.gate_proj.weight": gate[e], f"{e}.up_proj.weight": up[e], f"{e}.down_proj.weight": down[e]}
        if self.has_bias:
            gate_b, up_b = self._halves(fused["gate_up_proj_bias"])
            for e in range(self.num_experts):
                out |= {f"{e}.gate_proj.bias": gate_b[e], f"{e}.up_proj.bias": up_b[e],
                        f"{e}.down_proj.bias": fused["down_proj_bias"][e]}
        return out

    def fuse(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``split``: per-expert tensors -> the fused ones, in the module's stored layout."""
        def stacked(matrix: str, kind: str) -> torch.Tensor:
            return torch.stack([parts[f"{e}.{matrix}.{kind}"] for e in range(self.num_experts)])

        gate_up = self._join(stacked("gate_proj", "weight"), stacked("up_proj", "weight"))  # (E, 2I, H)
        down = stacked("down_proj", "weight")  # (E, H, I)
        out = {"gate_up_proj": gate_up.transpose(1, 2).contiguous() if self.transposed else gate_up,
               "down_proj": down.transpose(1, 2).contiguous() if self.transposed else down}
        if self.has_bias:
            out["gate_up_proj_bias"] = self._join(stacked("gate_proj", "bias"), stacked("up_proj", "bias"))
            out["down_proj_bias"] = stacked("down_proj", "bias")
        return {n: out[n] for n in self._order}

    def _halves(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, 2I, ...) -> gate, up (E, I, ...): the first and second half, or even and odd rows."""
        return (t.chunk(2, dim=1) if self.concatenated else (t[:, 0::2], t[:, 1::2]))

    def _join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.concatenated:
            return torch.cat([gate, up], dim=1)
        return torch.stack([gate, up], dim=2).flatten(1, 2)  # rows g0 u0 g1 u1 ...

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"] if self.has_bias else [])
        if all(prefix + n in state_dict for n in names):  # the fused layout (a checkpoint): split it
            fused = {n: state_dict.pop(prefix + n) for n in names}
            state_dict.update({prefix + k: v for k, v in self.split(fused).items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ the routed computation
    def forward(self, hidden_states: torch.Tensor, *routing, **named) -> torch.Tensor:
        """``hidden_states`` ``(T, H)``; the router's top-k expert indexes ``(T, k)`` and weights ``(T, k)``,
        positionally or by the model's keyword names."""
        top_k_index, top_k_weights = (*routing, *named.values())[:2]
        out = torch.zeros_like(hidden_states)
        every = self.calibrate_all or self.visit_all
        chosen = range(self.num_experts) if every else [e for e in top_k_index.unique().tolist() if e < self.num_experts]
        for e in chosen:  # (an index of E marks a masked slot: no expert computes it)
            token_idx, top_k_pos = torch.where(top_k_index == e)
            x = hidden_states if self.calibrate_all else hidden_states[token_idx]
            expert = self[e]
            gate, up = expert.gate_proj(x), expert.up_proj(x)
            if self.concatenated:
                gate_up = torch.cat([gate, up], dim=-1)
            else:
                gate_up = torch.stack([gate, up], dim=-1).flatten(-2)  # the model's interleaved order
            y = expert.down_proj(self._apply_gate(gate_up))
            if self.calibrate_all:
                y = y[token_idx]
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out


def _fused_state_dict(module: ExpertLinears, state_dict, prefix, local_metadata):
    """state_dict hook: the per-expert entries replaced by the fused tensors the model's checkpoint holds
    (unless ``fused_names`` is off, or the experts are packed: their layouts have no fused form)."""
    keys = [prefix + f"{e}.{m}.{kind}" for e in range(module.num_experts) for m in MATRICES
            for kind in (("weight", "bias") if module.has_bias else ("weight",))]
    if not module.fused_names or not all(k in state_dict for k in keys):
        return state_dict
    parts = {k[len(prefix):]: state_dict.pop(k) for k in keys}
    state_dict.update({prefix + k: v for k, v in module.fuse(parts).items()})
    return state_dict


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` (on any device, meta included) by ``ExpertLinears``
    holding views of its weights; returns how many were replaced."""
    fused = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    experts = fused[0][1].gate_up_proj.shape[0] if fused else 0
    for name, module in fused:
        tensors = {n: getattr(module, n) for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
                   if isinstance(getattr(module, n, None), torch.Tensor)}
        linears = ExpertLinears(module)
        for key, t in linears.split({n: t.detach() for n, t in tensors.items()}).items():
            e, matrix, kind = key.split(".")
            setattr(getattr(linears[int(e)], matrix), kind, nn.Parameter(t, requires_grad=False))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, linears)
    if fused:
        log.info("%d mixture-of-experts blocks of %d experts: each expert's matrices are linears of their own",
                 len(fused), experts)
    return len(fused)


def name_per_expert(model: nn.Module, per_expert: bool = True) -> None:
    """Name ``model``'s experts in its state_dict one tensor per expert and matrix (``experts.3.gate_proj.weight``,
    the hub layout transformers' save_pretrained writes for Qwen-MoE and DeepSeek), or fused (its in-memory
    layout)."""
    for m in model.modules():
        if isinstance(m, ExpertLinears):
            m.fused_names = not per_expert


@contextmanager
def per_expert_names(module: nn.Module) -> Iterator[None]:
    """Within it, ``module.state_dict()`` names each expert's linears, as the packed export writes them."""
    before = {m: m.fused_names for m in module.modules() if isinstance(m, ExpertLinears)}
    name_per_expert(module)
    try:
        yield
    finally:
        for m, fused in before.items():
            m.fused_names = fused


def routers(model: nn.Module) -> list[str]:
    """Names of the modules beside each block's experts holding a weight of one row per expert (or one: a
    shared-expert gate): the routers, which stay dense."""
    found = []
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, ExpertLinears):
                found += [f"{name}.{n}" if name else n for n, c in parent.named_children()
                          if isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2
                          and c.weight.shape[0] in (1, child.num_experts)]
    return found


def expert_blocks(model: nn.Module) -> dict[str, ExpertLinears]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertLinears)}


@contextmanager
def calibrating(block: nn.Module, options: MoeOptions) -> Iterator[dict[str, int]]:
    """Within it, every expert of ``block`` is called on every forward (with no tokens when the router sent it
    none, so the pipeline's per-chunk hooks fire; with every token for ``calibration="all"``); yields the
    minimum token count of each expert linear (name within ``block``) below which it is compressed without data."""
    moes = {name: m for name, m in block.named_modules() if isinstance(m, ExpertLinears)}
    for m in moes.values():
        m.visit_all, m.calibrate_all = True, options.calibration == "all"
    try:
        yield {f"{name}.{e}.{matrix}": options.min_tokens for name, m in moes.items()
               for e in range(m.num_experts) for matrix in MATRICES}
    finally:
        for m in moes.values():
            m.visit_all = m.calibrate_all = False
