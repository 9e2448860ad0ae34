"""Perplexity with the protocol of the Wanda/SparseGPT papers.

The whole evaluation text is tokenized once (hub datasets: rows joined with blank lines; files: as they are),
cut into non-overlapping windows of ``seqlen`` tokens (the ragged tail is dropped), and perplexity is
``exp`` of the mean next-token negative log-likelihood over every predicted token of every window.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from compress.calibration.data import read_text, tokenize

log = logging.getLogger(__name__)

PROTOCOL = "non-overlapping windows of seqlen tokens, text tokenized once, mean next-token NLL (Wanda/SparseGPT protocol)"


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int  # windows * seqlen, the tokens fed to the model
    predicted_tokens: int  # windows * (seqlen - 1), the tokens whose NLL is averaged
    seqlen: int
    windows: int
    source: str
    seconds: float
    protocol: str = PROTOCOL
    text_sha256: str = ""  # of the evaluation text: results on one text compare, whatever its path

    def to_dict(self) -> dict:
        return asdict(self)


def windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """``(n_windows, seqlen)`` non-overlapping windows of ``ids`` ``(1, n)``, at most ``limit`` of them."""
    n = ids.shape[-1] // seqlen
    if n == 0:
        raise ValueError(f"evaluation text has {ids.shape[-1]} tokens, fewer than --seqlen {seqlen}: lower --seqlen")
    if limit is not None:
        n = min(n, limit)
    return ids[0, : n * seqlen].reshape(n, seqlen)


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    source: str,
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``source`` (``wikitext2`` test split, or a .txt/.jsonl path)."""
    start = time.perf_counter()
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    if max_ctx and seqlen > max_ctx:
        log.warning("--seqlen %d exceeds the model's context %d; using %d", seqlen, max_ctx, max_ctx)
        seqlen = max_ctx
    text = read_text(source, split="test")
    batches = windows(tokenize(tokenizer, text), seqlen, limit)
    nll, count = 0.0, 0
    for i in range(0, batches.shape[0], batch_size):
        ids = batches[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (b, seqlen-1, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
        if on_window:
            on_window(min(i + batch_size, batches.shape[0]), batches.shape[0])
    return PerplexityResult(
        ppl=math.exp(nll / count), tokens=batches.numel(), predicted_tokens=count, seqlen=seqlen, windows=batches.shape[0], source=source,
        seconds=time.perf_counter() - start, text_sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
