"""Calibration text the model writes itself: for users without data (or without the network).

Every sample starts at the tokenizer's BOS token (EOS where there is none, as GPT-2's) and is sampled from
the model, seeded, with temperature and nucleus (top-p) sampling, to exactly ``seqlen`` tokens (EOS is
suppressed until then). The samples are the calibration windows as they are; their hash goes to the
manifest as a file's would. Generation needs the whole model in memory (on ``device``), unlike the
block-streamed compression.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import StoppingCriteria

from compress.calibration.data import CalibManifest, token_hash
from compress.config import CalibConfig

log = logging.getLogger(__name__)

SOURCE = "self"


@torch.no_grad()
def generate_calibration(model, tokenizer, cfg: CalibConfig, device: torch.device | str = "cpu",
                         batch_size: int = 128, on_tokens=None) -> tuple[torch.Tensor, CalibManifest]:
    """``(nsamples, seqlen)`` token ids sampled from ``model`` (module docstring) and their manifest.

    Args:
        cfg: ``source == "self"``; ``seed``, ``temperature`` and ``top_p`` drive the sampling.
        batch_size: samples generated together. On CPU each ``generate`` step has a large fixed cost
            (SmolLM2-135M here: 0.36 s per step for 4 samples on one busy thread; a batch of 32 samples x 512
            tokens had not finished after 15 minutes beside another job), so few large batches beat many
            small ones (the KV cache of 128 x 512 tokens is ~0.4 GB for that model).
        on_tokens: called after every sampling step with the number of tokens sampled so far (over all
            samples; ``nsamples * (seqlen - 1)`` at the end), for a progress bar with an ETA.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("--calib self starts every sample at the BOS (or EOS) token, and this tokenizer has "
                         "neither: pass a calibration file instead")
    model.eval()
    samples = []
    t0 = time.perf_counter()
    progress = [_Progress(on_tokens)] if on_tokens else []
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for done in range(0, cfg.nsamples, batch_size):
            n = min(batch_size, cfg.nsamples - done)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.seqlen - 1, min_new_tokens=cfg.seqlen - 1,
                use_cache=True, pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start,
                stopping_criteria=progress,
            )
            samples.append(out[:, : cfg.seqlen].cpu())
    tokens = torch.cat(samples)
    log.info("generated %d calibration samples of %d tokens in %.0f s (temperature %g, top-p %g, seed %d)",
             cfg.nsamples, cfg.seqlen, time.perf_counter() - t0, cfg.temperature, cfg.top_p, cfg.seed)
    manifest = CalibManifest(SOURCE, cfg.nsamples, cfg.seqlen, cfg.seed, int(tokens.numel()), token_hash(tokens),
                             generation={"start_token": int(start), "temperature": cfg.temperature,
                                         "top_p": cfg.top_p})
    return tokens, manifest


class _Progress(StoppingCriteria):
    """Never stops generation: counts the tokens sampled at every step for ``on_tokens``."""

    def __init__(self, on_tokens):
        self.on_tokens = on_tokens
        self.tokens = 0

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.tokens += input_ids.shape[0]
        self.on_tokens(self.tokens)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
