"""``compress.evaluate``: what ``compress eval`` measures, as one library call returning its JSON result."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def evaluate(model: str, ppl: str | None = None, tasks: list[str] | tuple[str, ...] = (), *,
             include_path: str | Path | None = None, num_fewshot: int | None = None, seed: int = 0,
             offline: bool = False, seqlen: int = 2048, limit: int | None = None, batch_size: int = 1,
             device: str = "auto", dtype: str = "auto", progress: bool = True) -> dict:
    """Perplexity on ``ppl`` (``wikitext2`` or a .txt/.jsonl path; the default when no ``tasks``) and lm-eval
    accuracy on ``tasks`` of ``model`` as ``compress.load`` runs it (activation thresholds installed, packed
    linears on compress's kernels).

    Returns:
        The result (``compress eval --json``): perplexity fields (``evals.perplexity.PerplexityResult``),
        ``zero_shot``, each thresholded linear's achieved ``activation_sparsity`` and the thresholds' setup,
        the folder's ``compression`` metadata, load time and versions.

    Raises:
        ValueError: a bad option, model or text, or a task that cannot be found or read, named.
    """
    from tqdm import tqdm

    from compress import export, load, models, outputs
    from compress.calibration.data import read_text
    from compress.evals.perplexity import perplexity
    from compress.evals.zeroshot import set_offline, zero_shot

    tasks = list(tasks)
    ppl = "wikitext2" if ppl is None and not tasks else ppl
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit} must be at least 1")
    if seqlen < 2 or batch_size < 1:
        raise ValueError(f"--seqlen {seqlen} must be >= 2 and --batch-size {batch_size} >= 1")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {str(include_path)!r} is not a folder: pass the folder of your task YAMLs")
    if offline:
        set_offline()
    if ppl not in (None, "wikitext2"):
        read_text(ppl)
    dev = models.resolve_device(device)
    start = time.perf_counter()
    lm, tokenizer = load(model, dtype, with_tokenizer=True)
    out = {"model": model, "load_seconds": time.perf_counter() - start}
    lm.to(dev)
    if ppl is not None:
        with tqdm(desc="perplexity", unit="window", file=sys.stderr, disable=not progress) as bar:
            def on_window(done, total):
                bar.total = total
                bar.update(done - bar.n)

            start = time.perf_counter()
            try:
                result = perplexity(lm, tokenizer, ppl, seqlen, limit, batch_size, dev, on_window)
            except ValueError as err:  # a text shorter than one window, the hub's text out of reach
                raise ValueError(f"--ppl {ppl}: {err}") from err
        out.update(result.to_dict(), ppl_seconds=time.perf_counter() - start)
    if tasks:
        out["zero_shot"] = zero_shot(lm, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                     seed=seed, include_path=str(include_path) if include_path else None).to_dict()
    sparsifiers = lm.compress_sparsifiers
    out["activation_sparsity"] = {name: hook.sparsity for name, hook in sparsifiers.items()} or None
    if sparsifiers:
        first = next(iter(sparsifiers.values()))
        out["activation_setup"] = {"position_bands_from": first.edges.tolist(), "token_scale": first.token_scale,
                                   "dense_prefill": first.dense_prefill}
    is_gguf = model.endswith(".gguf") and Path(model).is_file()
    out.update(compression=export.read_metadata(Path(model)) if Path(model).is_dir() or is_gguf else None,
               versions=outputs.versions())
    if is_gguf:  # what the file stores: report names it (a llama.cpp Q4_0 file is not "dense")
        out["gguf"] = export.gguf.describe(Path(model))
    return out
