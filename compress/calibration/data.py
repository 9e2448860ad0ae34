"""Calibration text -> seeded token batches, with a manifest that pins down exactly what was used.

Sources:
- ``wikitext2``: the Hugging Face ``wikitext-2-raw-v1`` train split via ``datasets`` (needs the network);
- a ``.txt`` file: used as is;
- a ``.jsonl`` file: the ``"text"`` field of every line, joined with blank lines.

Sampling follows the Wanda/SparseGPT protocol: the whole text is tokenized once and ``nsamples`` windows of
``seqlen`` tokens start at uniformly drawn offsets (seeded ``torch.Generator``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compress.config import CalibConfig

HUB_DATASETS = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1")}


class CalibrationError(ValueError):
    """Bad calibration input: the message names the value and the fix."""


@dataclass(frozen=True)
class CalibManifest:
    source: str
    nsamples: int
    seqlen: int
    seed: int
    text_tokens: int
    token_sha256: str
    generation: dict | None = None  # --calib self: how the model sampled its own calibration text

    def to_dict(self) -> dict:
        return asdict(self)


def check_source(source: str) -> None:
    """Fail fast (before loading any model) on a source that is neither a hub alias nor a file."""
    if source not in HUB_DATASETS and not Path(source).is_file():
        raise CalibrationError(
            f"calibration/evaluation source {source!r} is neither a file nor one of {sorted(HUB_DATASETS)}: "
            "pass a .txt or .jsonl path (or --calib self: text the model generates)"
        )


def read_text(source: str, split: str = "train") -> str:
    """Return the calibration or evaluation text named by ``source`` (a hub alias or a file path).

    Raises:
        CalibrationError: unknown alias, missing or unreadable file, or a file without text.
    """
    if source in HUB_DATASETS:
        return _read_hub_text(source, split)
    check_source(source)
    path = Path(source)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationError(f"cannot read {source!r} as UTF-8 text ({err}): pass a readable .txt or .jsonl") from err
    text = _jsonl_text(path, raw) if path.suffix == ".jsonl" else raw
    if not text.strip():
        raise CalibrationError(f"{source!r} holds no text: pass a file with calibration text")
    return text


def _jsonl_text(path: Path, raw: str) -> str:
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}:{lineno} is not JSON ({err.msg}): each line needs {{\"text\": ...}}") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{path}:{lineno} has no string field 'text': each line needs {{\"text\": ...}}")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _read_hub_text(alias: str, split: str) -> str:
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError(f"{alias} needs the `datasets` package: pip install datasets, or pass a .txt file") from err
    name, config = HUB_DATASETS[alias]
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "offline"
        raise CalibrationError(f"cannot load {alias} from the hub ({type(err).__name__}): pass a local .txt file instead") from err
    return "\n\n".join(rows["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text once, as the papers do. Returns ``(1, n_tokens)`` int64."""
    return tokenizer(text, return_tensors="pt").input_ids


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens at seeded uniform offsets. Returns ``(nsamples, seqlen)``."""
    n_tokens = ids.shape[-1]
    if n_tokens <= seqlen:
        raise CalibrationError(
            f"calibration text has {n_tokens} tokens, too short for --seqlen {seqlen}: use more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[0, s : s + seqlen] for s in starts.tolist()])


def token_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def calibration_batches(tokenizer, cfg: CalibConfig) -> tuple[torch.Tensor, CalibManifest]:
    """Build the calibration token matrix ``(nsamples, seqlen)`` and its manifest.

    Raises:
        CalibrationError: unreadable source, or text shorter than ``nsamples * seqlen`` tokens.
    """
    ids = tokenize(tokenizer, read_text(cfg.source, split="train"))
    needed = cfg.nsamples * cfg.seqlen
    if ids.shape[-1] < needed:
        raise CalibrationError(
            f"calibration text {cfg.source!r} has {ids.shape[-1]} tokens, fewer than --nsamples {cfg.nsamples} x "
            f"--seqlen {cfg.seqlen} = {needed}: give more text or lower --nsamples/--seqlen"
        )
    tokens = sample_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)
    manifest = CalibManifest(cfg.source, cfg.nsamples, cfg.seqlen, cfg.seed, int(ids.shape[-1]), token_hash(tokens))
    return tokens, manifest
