"""compress: post-training compression of causal language models (pruning, quantization, packing)."""

__version__ = "0.1.0"


def cache_dir():
    """Where compress keeps what it downloads or builds: ``$COMPRESS_CACHE``, else ``~/.cache/compress``."""
    import os
    from pathlib import Path

    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def prune(model: str, recipe, out, **options):
    """Compress ``model`` with ``recipe`` (a ``config.Recipe``) and write it to ``out``: what ``compress prune``
    does, with its run options as keywords (``fmt``, ``device``, ``overwrite``, ``resume``, ...; see
    ``compress.run.prune``). Returns the run's ``pipeline.Report``."""
    from compress.run import prune as run

    return run(model, recipe, out, **options)


def evaluate(model: str, ppl: str | None = None, tasks=(), **options) -> dict:
    """What ``compress eval`` measures (``compress.evals.evaluate.evaluate``): perplexity and lm-eval accuracy."""
    from compress.evals.evaluate import evaluate as run

    return run(model, ppl, tasks, **options)


def info(folder) -> dict:
    """What ``compress info`` prints (``compress.export.reading.info``): per-layer sparsity, bits, bytes, totals."""
    from compress.export.reading import info as run

    return run(folder)


def generate(model: str, prompt: str, max_new_tokens: int = 32, **options) -> dict:
    """What ``compress generate`` does (``compress.bench.generate``): greedy text and decode speed."""
    from compress.bench import generate as run

    return run(model, prompt, max_new_tokens, **options)


def bench(folder, **options) -> dict:
    """What ``compress bench`` measures (``compress.bench.run``): GEMV and decode speed against dense."""
    from compress.bench import run

    return run(folder, **options)


def load(spec: str, dtype: str = "auto", *, with_tokenizer: bool = False):
    """Load a model as compress would run it: a transformers causal LM (hub id, folder or .gguf) with the
    folder's activation thresholds installed (inputs below them are zeroed before each targeted linear, with
    the threshold of the token's position band, relative to the token's input RMS if the recipe says so); a
    ``--format packed`` folder's quantized linears are ``kernels.linear.PackedLinear`` modules.

    Returns:
        The model, or ``(model, tokenizer)`` with ``with_tokenizer``. ``model.compress_sparsifiers`` maps
        each thresholded linear to its hook, which counts the activations it zeroed.
    """
    from pathlib import Path

    from compress import models
    from compress.activations.thresholds import THRESHOLDS_FILE, install
    from compress.export import read_packed_table

    packed = read_packed_table(Path(spec))
    if packed is not None:  # compress's own layouts: linears run its kernels
        from transformers import AutoTokenizer

        model, tokenizer = models.load_packed(Path(spec), packed, models.DTYPES.get(dtype)), AutoTokenizer.from_pretrained(spec)
    else:
        model, tokenizer = models.load(spec, dtype)
    model.compress_sparsifiers = {}
    path = Path(spec) / THRESHOLDS_FILE
    if path.is_file():
        import json

        from safetensors import safe_open

        from compress.config import Recipe
        from compress.export import read_metadata

        meta = read_metadata(Path(spec)) or {}
        act = Recipe.from_dict(meta["recipe"]).act if meta.get("recipe") else None
        prefill, token_scale = (act.prefill, act.scale == "token") if act else ("sparse", False)
        with safe_open(str(path), framework="pt") as fh:
            table = {name: fh.get_tensor(name) for name in fh.keys()}
            gate_space = json.loads((fh.metadata() or {}).get("gate_space", "{}"))
            edges = tuple(json.loads((fh.metadata() or {}).get("position_bands", "[]")))
        from compress.experts import unfuse_experts

        unfuse_experts(model)  # thresholds of a mixture-of-experts model's experts name their linears
        model.compress_sparsifiers = install(model, table, prefill, gate_space, edges, token_scale)
    return (model, tokenizer) if with_tokenizer else model
