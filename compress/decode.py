"""Greedy decoding of llama-family models without the per-token machinery of ``generate`` (issue 25, step 3).

On a small model a transformers decode step spends more time in Python, dispatch and cache bookkeeping than in
its products (SmolLM2-135M packed: ~4 ms of products in a ~15 ms step). ``LeanDecoder`` reads the weights of the
loaded transformers model (packed or dense, nothing copied) and runs one decode step as a single function of
torch ops and compress's kernels, over a static KV cache: RMSNorm, q|k|v as one product, RoPE from a table,
one-position attention (``decode_attention``, a kernel of its own: a query against a short cache is too small
for BLAS or the compiler's generic loops), o, gate|up as one product, SiLU·up, down. Inductor fuses the
elementwise work into a few C++ loops around the kernels (traced as opaque ops). Prefill stays the transformers
model's own forward, its KV cache copied into the static one. The decoder is bound to the model's weights as
they are when it is built.

Activation sparsity (TEAL, WINA, CHESS: ``activations.thresholds.Sparsifier`` hooks on the linears) is traced
into the step: each product's input is zeroed below its thresholds before the product, as the hook does, so an
input-major packed linear (``Q4InputMajor``) skips the zeroed inputs' codes; with position bands the step picks
the band of its position. Linears with thresholds are not fused. The step also counts the inputs it zeroed,
added to the hooks' counts (``Sparsifier.sparsity``) once a ``generate`` ends.

Architectures: those whose decoder layers are llama's (``LLAMA_LIKE``). Others, and models with other hooks on
their modules, go through ``generate`` (``supports`` says which).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.activations.positions import TokenPositions, band_of
from compress.activations.thresholds import Sparsifier, UpOutput
from compress.kernels import ops, reference
from compress.kernels.build import ops as compiled_kernels
from compress.kernels.linear import PackedLinear

LLAMA_LIKE = ("llama", "mistral", "qwen2")
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj")


def _sparsifier(module: nn.Module) -> Sparsifier | None:
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, Sparsifier)]
    return hooks[0] if len(hooks) == 1 else None


def _traceable_hooks(module: nn.Module) -> bool:
    """No hooks, or only what the step reproduces: one activation sparsifier before a linear, CHESS's record of
    an up projection's output after it, the model's record of token positions (for position bands)."""
    def known(hook) -> bool:
        return isinstance(hook, (Sparsifier, UpOutput)) or isinstance(getattr(hook, "__self__", None), TokenPositions)

    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return all(known(h) for h in hooks) and sum(isinstance(h, Sparsifier) for h in hooks) <= 1


def supports(model: nn.Module) -> bool:
    """Whether ``LeanDecoder`` runs ``model``: a llama-family decoder, no hooks on its modules but activation
    sparsifiers (and what they read), no sliding window shorter than the context (checked per call), batch 1."""
    config = model.config
    if config.model_type not in LLAMA_LIKE or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(config, "rope_parameters", {}).get("rope_type", "default") == "dynamic":
        return False  # its frequencies change with the length: the table would be wrong
    return all(_traceable_hooks(m) for m in model.modules())


def _sparsified(module: nn.Module, product: Callable, zeros: list) -> Callable:
    """``product`` after ``module``'s activation sparsifier, if it has one: ``(x, up, pos) -> product(x')``,
    ``x'`` zeroed below the thresholds of position ``pos``'s band (``up``: the up projection's output, for
    CHESS on a down projection); each call appends ``(hook, zeros in x', numel)`` to ``zeros``."""
    hook = _sparsifier(module)
    if hook is None:
        return lambda x, up, pos: product(x)
    t, edges = hook.t.float(), hook.edges

    def bound(pos: torch.Tensor) -> torch.Tensor:  # (in,)
        return t[0] if len(edges) == 0 else t.index_select(0, band_of(edges, pos.view(1)))[0]

    def sparse_product(x: torch.Tensor, up: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        x = hook.zero_below(x, bound(pos).to(x.dtype), up if hook.up is not None else None)
        zeros.append((hook, (x == 0).sum(), x.numel()))
        return product(x)

    return sparse_product


def _product(modules: list[nn.Module], zeros: list):
    """``(x, up=None, pos=None) -> [x Wᵢᵀ + bᵢ]`` for linears that read the same input at position ``pos``: their
    shared packed product when they have one (``kernels.fused``; never with activation sparsifiers), else each
    its own, after its sparsifier (``_sparsified``, counting into ``zeros``)."""
    shared = getattr(modules[0], "shared", None)
    if shared is not None and all(m.shared is shared for m in modules):
        sizes = [m.out_features for m in modules]
        bias = None
        if any(m.bias is not None for m in modules):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules])
        return lambda x, up=None, pos=None: (shared.product(x) if bias is None else shared.product(x) + bias).split(sizes, dim=-1)
    singles = []
    for m in modules:
        if isinstance(m, PackedLinear):
            single = lambda x, p=m.product, b=m.bias: p(x) if b is None else p(x) + b  # noqa: E731
        else:
            single = lambda x, m=m: F.linear(x, m.weight, m.bias)  # noqa: E731
        singles.append(_sparsified(m, single, zeros))
    return lambda x, up=None, pos=None: [f(x, up, pos) for f in singles]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: in fp32, cast back before the weight."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``(heads, D)`` at one position (``cos``, ``sin``: ``(1, D)``), transformers' half rotation."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanDecoder:
    """Greedy decoding of ``model`` (batch 1) with a static KV cache of ``max_len`` positions.

    ``generate(ids, n)`` returns the ``n`` tokens after ``ids`` ``(1, T)``; ``T + n <= max_len``.
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = True):
        if not supports(model):
            raise ValueError(f"{model.config.model_type}: the lean decoder runs {', '.join(LLAMA_LIKE)} models "
                             "with no hooks but activation sparsifiers; use transformers' generate")
        config, body = model.config, model.model
        self.model, self.max_len = model, max_len
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self._zeros: list = []  # (hook, zeroed inputs, inputs) of each sparsified product of the step being run
        zeros = self._zeros
        self.layers = [(layer.input_layernorm.weight, _product([getattr(layer.self_attn, n) for n in ATTENTION], zeros),
                        _product([layer.self_attn.o_proj], zeros), layer.post_attention_layernorm.weight,
                        _product([getattr(layer.mlp, n) for n in MLP], zeros), _product([layer.mlp.down_proj], zeros))
                       for layer in body.layers]
        self.norm, self.head = body.norm.weight, _product([model.lm_head], zeros)
        self._counted: list = []  # (hook, inputs per step) in the order of the step's counts
        self.scaling = body.layers[0].self_attn.scaling
        dtype = body.norm.weight.dtype
        with torch.no_grad():
            probe = torch.zeros(1, dtype=dtype)
            cos, sin = body.rotary_emb(probe, torch.arange(max_len).unsqueeze(0))  # (1, max_len, D)
        self.cos, self.sin = cos[0], sin[0]
        self.cache = torch.zeros(len(self.layers), 2, self.kv_heads, max_len, self.head_dim, dtype=dtype)
        kernels = compiled_kernels()
        native = kernels is not None and self.cache.is_cpu and dtype == torch.float32
        self.attention = kernels.decode_attention if native else reference.decode_attention
        self.compile = compile
        self._steps: dict[str, Callable] = {}  # activation precision -> its compiled step

    def step(self, x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The next token after the embedded token ``x`` ``(1, hidden)`` at position ``pos`` (0-d) over the keys
        and values of the positions before it, ``cache`` ``(layers, 2, kv_heads, max_len, D)``; returns the token
        ``(1,)``, this position's keys and values ``(layers, 2, kv_heads, D)``, for the caller to store, and the
        inputs each activation sparsifier zeroed ``(sparsifiers,)`` (in ``_counted``'s order).

        The cache is only read here: a compiled graph that writes into an input copies all of it."""
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        at = pos.view(1)
        cos, sin = self.cos.index_select(0, at), self.sin.index_select(0, at)  # (1, D)
        new = []
        self._zeros.clear()
        for (norm_in, qkv, o, norm_post, gate_up, down), past in zip(self.layers, cache):
            q, k, v = qkv(_rms(x, norm_in, self.eps), pos=pos)
            q = _rotate(q.view(H, D), cos, sin)
            k, v = _rotate(k.view(KV, D), cos, sin), v.view(KV, D)
            attended = self.attention(q, past[0], past[1], k, v, pos, self.scaling)  # (H, D)
            x = x + o(attended.reshape(1, H * D), pos=pos)[0]
            gate, up = gate_up(_rms(x, norm_post, self.eps), pos=pos)
            x = x + down(F.silu(gate) * up, up, pos)[0]
            new.append(torch.stack([k, v]))
        (logits,) = self.head(_rms(x, self.norm, self.eps), pos=pos)
        self._counted = [(hook, n) for hook, _, n in self._zeros]
        zeros = torch.stack([z for _, z, _ in self._zeros]) if self._zeros else torch.zeros(0, dtype=torch.long)
        return logits.argmax(-1), torch.stack(new), zeros

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        T = ids.shape[1]
        if ids.shape[0] != 1 or new_tokens < 1 or T + new_tokens > self.max_len:
            raise ValueError(f"ids {tuple(ids.shape)} + {new_tokens} new tokens: batch 1, at least one new token and "
                             f"at most {self.max_len} positions in all")
        window = getattr(self.model.config, "sliding_window", None)
        if window is not None and getattr(self.model.config, "use_sliding_window", True) and T + new_tokens > window:
            raise ValueError(f"{T + new_tokens} positions exceed the sliding window {window}: use generate")
        out = self.model(ids, use_cache=True)
        for i, layer in enumerate(out.past_key_values.layers):
            self.cache[i, 0, :, :T], self.cache[i, 1, :, :T] = layer.keys[0], layer.values[0]
        token = out.logits[0, -1].argmax(-1, keepdim=True)
        tokens = [token]
        embed = self.model.model.embed_tokens
        zeroed = 0
        for pos in range(T, T + new_tokens - 1):
            args = (embed(token), torch.tensor(pos), self.cache)
            token, new, zeros = self._compiled(args)(*args)
            self.cache[:, :, :, pos] = new
            tokens.append(token)
            zeroed = zeroed + zeros
        if new_tokens > 1:  # the hooks count what the steps zeroed, as if they had run
            for (hook, n), z in zip(self._counted, zeroed):
                hook.zeros, hook.total = hook.zeros + z, hook.total + n * (new_tokens - 1)
        return torch.cat(tokens)

    def _compiled(self, example: tuple) -> Callable:
        """The step for the current activation precision (the products' choice is traced into it), compiled on
        first use: traced to an FX graph with real tensors (``make_fx``: the weights become its constants) and
        compiled by inductor. Unlike ``torch.compile`` this leaves no dynamo guards to check at every call (~1 ms
        a token on SmolLM2-135M, over 200 weight tensors) and compiles in a third of the time. Inductor writes
        the code that calls the step's kernels in C++ (``cpp_wrapper``), not Python: SmolLM2-135M's step makes
        ~130 kernel calls and ~300 fused loops, and their Python calls cost ~1 ms a token (1.15x slower)."""
        if not self.compile:
            return self.step
        precision = ops.act_precision()
        if precision not in self._steps:
            from torch.fx.experimental.proxy_tensor import make_fx

            graph = make_fx(lambda x, pos, cache: self.step(x, pos, cache))(*example)
            for node in graph.graph.nodes:  # each has a fake value of its own fake mode, which cpp_wrapper's
                if node.op == "placeholder":  # compile refuses to mix: let it fake the inputs anew
                    node.meta.pop("val", None)
            with torch._inductor.config.patch(cpp_wrapper=True):
                self._steps[precision] = torch._inductor.compile(graph, list(example))
        return self._steps[precision]
