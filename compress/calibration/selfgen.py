"""Calibration text the model writes itself: for users without data (or without the network).

Every sample starts at the tokenizer's BOS token (EOS where there is none, as GPT-2's) and is sampled from
the model, seeded, with temperature and nucleus (top-p) sampling, to exactly ``seqlen`` tokens (EOS is
suppressed until then). The samples are the calibration windows as they are; their hash goes to the
manifest as a file's would. Generation needs the whole model in memory (on ``device``), unlike the
block-streamed compression.

The sampling loop is our own rather than ``generate``'s: with a batch of 128 samples ``generate`` spends most
of a step outside the model's weights, sorting every row of the 49k-token vocabulary for top-p (``nucleus``
looks at the most likely tokens first) and growing the KV cache by concatenation, which copies the whole cache
at every token (``_PreallocatedLayer`` writes into buffers of the sample's length instead).
"""

from __future__ import annotations

import logging
import time

import torch
from transformers.cache_utils import Cache, DynamicLayer

from compress.calibration.data import CalibManifest, token_hash
from compress.config import CalibConfig

log = logging.getLogger(__name__)

SOURCE = "self"
NUCLEUS_TOP_K = 1024  # candidates tried before a full sort of the row


@torch.no_grad()
def generate_calibration(model, tokenizer, cfg: CalibConfig, device: torch.device | str = "cpu",
                         batch_size: int = 128, on_tokens=None) -> tuple[torch.Tensor, CalibManifest]:
    """``(nsamples, seqlen)`` token ids sampled from ``model`` (module docstring) and their manifest.

    Args:
        cfg: ``source == "self"``; ``seed``, ``temperature`` and ``top_p`` drive the sampling.
        batch_size: samples generated together. On CPU a step's cost is mostly fixed (weights read once per
            step), so few large batches beat many small ones; memory grows with the batch: the KV cache of
            128 x 512 tokens is 3.0 GB for SmolLM2-135M (30 layers x 2 x 3 heads x 64 x 4 bytes per token).
        on_tokens: called after every sampling step with the number of tokens sampled so far (over all
            samples; ``nsamples * (seqlen - 1)`` at the end), for a progress bar with an ETA.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("--calib self starts every sample at the BOS (or EOS) token, and this tokenizer has "
                         "neither: pass a calibration file instead")
    device = torch.device(device)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the caller's random stream stays untouched
    eos = tokenizer.eos_token_id
    samples, sampled = [], 0
    t0 = time.perf_counter()
    for done in range(0, cfg.nsamples, batch_size):
        n = min(batch_size, cfg.nsamples - done)
        ids = torch.full((n, cfg.seqlen), start, dtype=torch.long, device=device)
        cache = Cache(layer_class_to_replicate=lambda: _PreallocatedLayer(cfg.seqlen))
        for pos in range(1, cfg.seqlen):
            out = model(input_ids=ids[:, pos - 1: pos], past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            if eos is not None:
                logits[:, eos] = float("-inf")  # EOS would end a sample early
            ids[:, pos] = sample(logits, cfg.temperature, cfg.top_p, gen)
            sampled += n
            if on_tokens:
                on_tokens(sampled)
        samples.append(ids.cpu())
    tokens = torch.cat(samples)
    log.info("generated %d calibration samples of %d tokens in %.0f s (temperature %g, top-p %g, seed %d)",
             cfg.nsamples, cfg.seqlen, time.perf_counter() - t0, cfg.temperature, cfg.top_p, cfg.seed)
    manifest = CalibManifest(SOURCE, cfg.nsamples, cfg.seqlen, cfg.seed, int(tokens.numel()), token_hash(tokens),
                             generation={"start_token": int(start), "temperature": cfg.temperature,
                                         "top_p": cfg.top_p})
    return tokens, manifest


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``(batch, vocab)`` logits: softmax at ``temperature``, restricted to the nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        probs = nucleus(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def nucleus(probs: torch.Tensor, top_p: float, top_k: int = NUCLEUS_TOP_K) -> torch.Tensor:
    """``probs`` with every token outside each row's nucleus zeroed (not renormalized): the most likely
    tokens whose preceding mass is below ``top_p`` (the smallest set reaching it).

    Exact, not approximate: a row whose ``top_k`` most likely tokens reach ``top_p`` has its whole nucleus
    among them, since every other token is preceded by at least their mass; only the other rows are sorted
    in full.
    """
    k = min(top_k, probs.shape[-1])
    top, idx = probs.topk(k, dim=-1)
    kept = torch.zeros_like(probs).scatter_(-1, idx, top * (top.cumsum(-1) - top < top_p))
    wide = (top.sum(-1) < top_p).nonzero().squeeze(1)
    if wide.numel():
        ordered, order = probs[wide].sort(dim=-1, descending=True)
        kept[wide] = torch.zeros_like(ordered).scatter_(-1, order, ordered * (ordered.cumsum(-1) - ordered < top_p))
    return kept


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values are views into buffers of ``capacity`` tokens, filled in place.

    transformers' ``DynamicLayer`` concatenates every step: at 400 tokens of 128 samples that copied 2.4 GB
    per step over SmolLM2-135M's 30 layers. The views hold exactly the tokens so far, so attention needs no
    mask (unlike ``StaticCache``, whose masked full-length keys also defeat grouped-query SDPA).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self._keys = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values
