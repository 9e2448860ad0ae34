"""Speed of a compressed folder as compress runs it: per-layer GEMV and end-to-end greedy decode.

Every figure is a median of several runs; the variants of one measurement run interleaved (round-robin) so a
slower period of a shared machine hits them alike. Decode speed excludes the prefill: it is
``(new - 1) / (t(new tokens) - t(1 token))`` for the same prompt.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress import decode
from compress.kernels.linear import PackedEmbedding, PackedLinear

log = logging.getLogger(__name__)

PROMPT = "The history of the city began"


def _median_ms(fns: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _torch_int4(weight, x: torch.Tensor):
    """torch's int4 CPU kernel on the same codes (bf16 input, its fast path), or None where it does not apply."""
    group = weight.group_size
    if type(weight).__name__ != "Q4Dense" or group not in (32, 64, 128, 256) or weight.shape[1] % 64:
        return None
    W = weight.unpack()
    scale = weight.scale.movedim(-1, 1).reshape(-1, weight.scale.shape[1])[: weight.shape[0]]  # (out, groups)
    codes = torch.round(W / scale.repeat_interleave(group, dim=1)).to(torch.int32) + 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale_zero = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).contiguous().bfloat16()
    xb = x.bfloat16()
    return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, scale_zero)


def gemv(model: nn.Module, repeats: int = 21) -> list[dict]:
    """Batch-1 time of each distinct packed layer (layout, shape, group) vs F.linear on its dense weights in
    fp32 and bf16 and vs torch's int4 kernel (symmetric dense layouts), at the current thread count."""
    rows, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        key = (module.layout.__name__, module.out_features, module.in_features, module.group_size)
        if key in seen:
            continue
        seen.add(key)
        weight = module.weight_packed
        W = weight.unpack()
        Wb = W.bfloat16()
        x = torch.randn(1, module.in_features)
        fns = {"ours": lambda: module(x), "fp32": lambda: F.linear(x, W), "bf16": lambda: F.linear(x.bfloat16(), Wb)}
        if weight.zero is None and (int4 := _torch_int4(weight, x)) is not None:
            fns["torch int4"] = int4
        ms = _median_ms(fns, repeats)
        rows.append({"layer": name, "layout": key[0], "shape": [key[1], key[2]], "group_size": key[3],
                     "bytes": weight.nbytes, "ms": ms, "GBps": weight.nbytes / ms["ours"] / 1e6})
    return rows


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose packed linears are plain ``nn.Linear`` with the same (dequantized) weights:
    the dense export of the same compressed weights."""
    twin = copy.deepcopy(model)
    dense: dict[int, nn.Linear] = {}
    for name, module in list(twin.named_modules()):
        if isinstance(module, PackedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.weight_packed.unpack()
            if module.bias is not None:
                linear.bias.data = module.bias.data.clone()
            dense[id(module)] = linear
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, leaf, linear)
    for name, module in list(twin.named_modules()):
        if isinstance(module, PackedEmbedding):  # tied to a packed lm_head: share its dense weights
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim)
            embedding.weight = dense[id(module.head)].weight
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, leaf, embedding)
    return twin.eval()


CACHE_BUCKET = 256  # compiled decoding: KV cache lengths are multiples of this, so few lengths are compiled


_LEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled LeanDecoder


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (None: as they are) within, restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int, compiled: bool = False) -> torch.Tensor:
    """The ``new_tokens`` greedy tokens after ``ids`` ``(1, T)``.

    Args:
        compiled: decode steps compiled (inductor) over a static KV cache, compress's kernels traced as opaque
            ops: ``decode.LeanDecoder`` for llama-family models (one compiled function per step, kept per model),
            else transformers' generate with a static cache and its compiled forward. The per-token Python and
            dispatch of the eager model, which on a small model costs more than its products, mostly goes. The
            first call per cache length compiles (a minute or two on a CPU); the cache length is rounded up to a
            multiple of ``CACHE_BUCKET`` so later calls reuse it. Prefill stays eager.
    """
    length = -(-(ids.shape[1] + new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    if compiled and ids.shape[0] == 1 and decode.supports(model):
        lean = _LEAN.get(model)
        if lean is None or lean.max_len < length:
            lean = _LEAN[model] = decode.LeanDecoder(model, length)
        return lean.generate(ids, new_tokens)
    kwargs = {}
    if compiled:
        from transformers import CompileConfig, StaticCache

        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers compiles on accelerators only, unless told so
        kwargs = {"cache": StaticCache(config=model.config, max_cache_len=length), "compile_config": config}
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, **kwargs)[0, ids.shape[1]:]


def decode_speed(models: dict[str, nn.Module], ids: torch.Tensor, new_tokens: int, repeats: int = 3,
                 compiled: bool = False) -> dict[str, float]:
    """Greedy decode tokens/s of each model (prefill excluded), medians, the models interleaved."""
    full = _median_ms({n: (lambda m=m: greedy(m, ids, new_tokens, compiled)) for n, m in models.items()}, repeats)
    one = _median_ms({n: (lambda m=m: greedy(m, ids, 1, compiled)) for n, m in models.items()}, repeats)
    return {n: (new_tokens - 1) / max(full[n] - one[n], 1e-6) * 1e3 for n in models}


def llama_cpp_speed(gguf: str, prompt: str, new_tokens: int, threads: int, repeats: int = 3) -> float | None:
    """llama.cpp's greedy decode tokens/s on ``gguf``: ``llama-bench -p 0 -n N -t T`` (the binary ``$LLAMA_BENCH``
    names, or ``llama-bench`` on PATH; prompt-free, as llama.cpp reports decode), else llama-cpp-python on
    ``prompt``; None when neither is installed."""
    binary = os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")
    if binary:
        out = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", str(repeats),
                              "-o", "json"], capture_output=True, text=True)
        if out.returncode == 0:
            return float(json.loads(out.stdout)[0]["avg_ts"])
        log.warning("%s failed on %s (%s); trying llama-cpp-python", binary, gguf, out.stderr.strip()[-200:])
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf, n_threads=threads, n_ctx=512, verbose=False)
    rates = []
    for _ in range(repeats):
        out = llm(prompt, max_tokens=new_tokens, temperature=0.0)
        timings = out.get("timings") or {}
        if "predicted_per_second" in timings:
            rates.append(timings["predicted_per_second"])
        else:
            start = time.perf_counter()
            llm(prompt, max_tokens=new_tokens, temperature=0.0)
            rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def speed_lines(measured: dict) -> list[str]:
    """One thread count's GEMV table and decode rates (``run``'s ``by_threads`` entry), as printed."""
    lines = [f"{'layer':<40}{'layout':>12}{'shape':>12}{'ours ms':>9}{'fp32 ms':>9}{'bf16 ms':>9}{'int4 ms':>9}{'GB/s':>7}"]
    for r in measured["gemv"]:
        ms = r["ms"]
        lines.append(f"{r['layer']:<40}{r['layout']:>12}{'x'.join(map(str, r['shape'])):>12}{ms['ours']:>9.3f}"
                     f"{ms['fp32']:>9.3f}{ms['bf16']:>9.3f}{ms.get('torch int4', float('nan')):>9.3f}{r['GBps']:>7.1f}")
    rates, llama = measured["decode_tokens_per_s"], measured["llama_cpp_tokens_per_s"]
    base = rates.get("dense original") or rates["dense export"]
    lines += [f"decode {name:<27} {rate:7.1f} tokens/s  ({rate / base:.2f}x)" for name, rate in rates.items()]
    if llama is not None:
        best = max(rate for name, rate in rates.items() if name.startswith("compressed"))
        lines.append(f"decode {'llama.cpp (GGUF)':<27} {llama:7.1f} tokens/s  ({llama / base:.2f}x); compressed "
                     f"(fastest) is {best / llama:.2f}x llama.cpp")
    return lines


def generate(model: str, prompt: str, max_new_tokens: int = 32, *, threads: int | None = None, dtype: str = "auto",
             compile: bool = False) -> dict:
    """``compress generate``: greedy continuation of ``prompt`` by ``model`` as ``compress.load`` runs it, with
    the decode speed (prefill and the first token timed apart; ``compile`` compiles outside the timing).

    Raises:
        ValueError: a bad option or model, named.
    """
    from compress import load

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads} must be at least 1")
    lm, tokenizer = load(model, dtype, with_tokenizer=True)
    with torch_threads(threads):
        return _timed_generate(lm, tokenizer, prompt, max_new_tokens, compile)


def _timed_generate(lm, tokenizer, prompt: str, max_new_tokens: int, compile: bool) -> dict:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if compile:
        log.info("compiling the decode step (inductor)")
        start = time.perf_counter()
        greedy(lm, ids, 2, compiled=True)
        log.info("compiled in %.0f s", time.perf_counter() - start)
    start = time.perf_counter()
    greedy(lm, ids, 1, compile)  # prefill and one token, timed apart
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = greedy(lm, ids, max_new_tokens, compile)
    total = time.perf_counter() - start
    return {"text": prompt + tokenizer.decode(out, skip_special_tokens=True), "new_tokens": len(out),
            "seconds": total, "decode_tokens_per_s": (len(out) - 1) / max(total - prefill, 1e-9),
            "prompt_tokens": ids.shape[1], "prefill_ms": prefill * 1e3, "threads": torch.get_num_threads()}


def run(folder: Path, threads: tuple[int, ...] = (1, 2), new_tokens: int = 128, repeats: int = 3, prompt: str = PROMPT,
        compile: bool = False, gguf: str | None = None) -> dict:
    """``compress bench``: per-layer GEMV and greedy decode speed of a compress output folder, against the dense
    export of the same weights and the dense original (from compression.json), and llama.cpp (``llama_cpp_speed``)
    on ``gguf`` or else the original when it is a GGUF; per thread count.

    Raises:
        ValueError: a bad option, or a folder compress did not write.
    """
    from compress import export, load, models

    if new_tokens < 2 or repeats < 1 or min(threads) < 1:
        raise ValueError(f"--new-tokens {new_tokens} must be >= 2, --repeats {repeats} and --threads {list(threads)} >= 1")
    if gguf is not None and not Path(gguf).is_file():
        raise ValueError(f"--gguf {gguf!r} is not a file: pass llama.cpp's GGUF of the same model")
    meta = export.read_metadata(folder)
    if meta is None:
        raise ValueError(f"{str(folder)!r} has no compression.json: pass a folder written by compress prune")
    lm, tokenizer = load(str(folder), with_tokenizer=True)
    source = meta.get("source_model")
    contenders = {"compressed": lm, "dense export": dense_twin(lm)}
    try:
        contenders["dense original"] = models.load(source)[0] if source else None
    except ValueError as err:
        log.warning("dense original %s not loadable (%s): compared with the dense export only", source, err)
    contenders = {k: v for k, v in contenders.items() if v is not None}
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    first = {name: greedy(m, ids, 32) for name, m in contenders.items()}
    results = {"model": str(folder), "source_model": source, "prompt": prompt, "new_tokens": new_tokens,
               "repeats": repeats, "same_first_32_tokens_as_dense_export":
                   bool(torch.equal(first["compressed"], first["dense export"])), "by_threads": {}}
    for n in threads:
        with torch_threads(n):
            rows = gemv(lm, repeats=max(repeats, 11))
            rates = decode_speed(contenders, ids, new_tokens, repeats)
            if compile:
                for m in contenders.values():  # compile outside the timed runs
                    greedy(m, ids, 2, compiled=True)
                compiled = decode_speed(contenders, ids, new_tokens, repeats, compiled=True)
                rates.update({f"{name} (compiled)": rate for name, rate in compiled.items()})
            gguf = gguf or (source if source and source.endswith(".gguf") else None)
            llama = llama_cpp_speed(gguf, prompt, new_tokens, n, repeats) if gguf else None
            results["by_threads"][n] = {"gemv": rows, "decode_tokens_per_s": rates, "llama_cpp_tokens_per_s": llama}
    return results
