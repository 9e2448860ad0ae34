"""GEMV speed of compress's packed-weight kernels vs torch on the shapes of a 7B model (issue 5).

For each shape ``(out, in)`` and thread count: batch-1 product time (median of ``--repeats`` runs, each after a
warm-up) of fp32 and bf16 ``F.linear``, torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``, bf16 input:
its fast path; its fp32-input path is reported too), our dense W4 (group 128, symmetric), our 2:4 + W4, and
our input-major activation-sparse product at 50% zero inputs (fp32 and bf16) next to the dense product of the
same dtype, and our input-major W4 (the layout of packed linears with activation thresholds) at 0% and 50% zero
inputs next to our row-major W4; and at group 32 (issue 25): our W4 with int8 inputs (integer dot products)
and with fp32 inputs, and our 2:4 + W4 with int8 (AVX-512 VNNI or AVX2) and fp32 inputs, and at
group 64 W4 and 2:4 + W4 on int8 inputs; and our input-major W4 g32 on int8 inputs with 0% and 40% zero inputs
(TEAL's sparsity, at random), whose bytes count the live inputs' codes and every scale (each variant reads
one matrix, which may stay in the L3 between its calls: ``input_major.py`` measures input-major in DRAM).
Integer-kernel layouts hold fp16 scales, as packed folders do; the fp32-input kernels read fp32 scales (what a
product binds for them), and their bytes count those. Also the weight bytes each reads, the GB/s that makes,
and the machine's read and copy bandwidth measured the same way. All variants of one shape run interleaved,
round-robin, so a slower period of a shared machine hits them alike.

    python benchmarks/gemv.py --json kernels.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.kernels.build import ops
from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
GROUP = 128


def _fp32_scales(layout):
    return dataclasses.replace(layout, scale=layout.scale.float())


def _variants(out: int, n_in: int, gen: torch.Generator) -> dict:
    """name -> (callable, weight bytes read per call)."""
    k = ops()
    codes = torch.randint(-8, 8, (out, n_in), dtype=torch.int8, generator=gen)
    scale = torch.rand(out, n_in // GROUP, generator=gen) / 8
    q4 = _fp32_scales(Q4Dense.pack(codes, scale, None, GROUP))  # the fp32-input kernels read fp32 scales
    im = _fp32_scales(Q4InputMajor.pack(codes, scale, None, GROUP))
    runs = codes.reshape(out, -1, 4).clone()
    runs[..., 2:] = 0  # any 2:4 pattern reads the same bytes
    s24 = _fp32_scales(Q4Sparse24.pack(runs.reshape(out, n_in), scale, None, GROUP))
    W = torch.randn(out, n_in, generator=gen) / 64
    Wb = W.bfloat16()
    WT, WTb = W.t().contiguous(), Wb.t().contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + 8), 1)
    scale_zero = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).contiguous()  # (groups, out, 2)
    sz_b = scale_zero.bfloat16()
    x = torch.randn(1, n_in, generator=gen)
    xb = x.bfloat16()
    x50 = x * (torch.rand(1, n_in, generator=gen) < 0.5)
    scale32, scale64 = torch.rand(out, n_in // 32, generator=gen) / 8, torch.rand(out, n_in // 64, generator=gen) / 8
    q4_32 = Q4Dense.pack(codes, scale32, None, 32)  # fp16 scales, as packed folders store them
    s24_32 = Q4Sparse24.pack(runs.reshape(out, n_in), scale32, None, 32)
    q4_64, s24_64 = Q4Dense.pack(codes, scale64, None, 64), Q4Sparse24.pack(runs.reshape(out, n_in), scale64, None, 64)
    q4_32f, s24_32f = _fp32_scales(q4_32), _fp32_scales(s24_32)
    im_32 = Q4InputMajor.pack(codes, scale32, None, 32)
    x40 = x * (torch.rand(1, n_in, generator=gen) >= 0.4)  # TEAL's 40%: inputs zeroed at random
    im_codes = im_32.data.numel()  # bytes of codes; the scales are read for every group with a live input
    int4_bytes = packed.numel() + scale_zero.numel() * 2
    return {
        "fp32 F.linear": (lambda: F.linear(x, W), W.numel() * 4),
        "bf16 F.linear": (lambda: F.linear(xb, Wb), W.numel() * 2),
        "torch int4 (bf16 x)": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, sz_b), int4_bytes),
        "torch int4 (fp32 x)": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scale_zero), int4_bytes * 2),
        "ours W4 g128": (lambda: k.q4_dense_mm(x, q4.data, q4.scale, q4.zero, out, GROUP), q4.nbytes),
        "ours 2:4 + W4 g128": (lambda: k.q4_sparse24_mm(x, s24.data, s24.pos, s24.scale, s24.zero, out, GROUP), s24.nbytes),
        "ours W4 g128 input-major": (lambda: k.q4_input_major_mm(x, im.data, im.scale, im.zero, out, GROUP), im.nbytes),
        "ours W4 g128 input-major act 50%": (lambda: k.q4_input_major_mm(x50, im.data, im.scale, im.zero, out, GROUP),
                                             im.nbytes // 2),
        "ours W4 g32 int8 x": (lambda: k.q4_dense_i8_mm(x, q4_32.data, q4_32.scale, q4_32.zero, out, 32), q4_32.nbytes),
        "ours W4 g32 fp32 x": (lambda: k.q4_dense_mm(x, q4_32f.data, q4_32f.scale, q4_32f.zero, out, 32), q4_32f.nbytes),
        "ours 2:4 + W4 g32 int8 x": (lambda: k.q4_sparse24_i8_mm(x, s24_32.data, s24_32.pos, s24_32.scale, s24_32.zero, out, 32),
                                     s24_32.nbytes),
        "ours 2:4 + W4 g32 fp32 x": (lambda: k.q4_sparse24_mm(x, s24_32f.data, s24_32f.pos, s24_32f.scale, s24_32f.zero, out, 32),
                                     s24_32f.nbytes),
        "ours W4 g64 int8 x": (lambda: k.q4_dense_i8_mm(x, q4_64.data, q4_64.scale, q4_64.zero, out, 64), q4_64.nbytes),
        "ours 2:4 + W4 g64 int8 x": (lambda: k.q4_sparse24_i8_mm(x, s24_64.data, s24_64.pos, s24_64.scale, s24_64.zero, out, 64),
                                     s24_64.nbytes),
        "ours W4 g32 input-major int8 x": (lambda: k.q4_input_major_i8_mm(x, im_32.data, im_32.scale, im_32.zero, out, 32),
                                           im_32.nbytes),
        "ours W4 g32 input-major int8 x act 40%": (
            lambda: k.q4_input_major_i8_mm(x40, im_32.data, im_32.scale, im_32.zero, out, 32),
            im_32.nbytes - im_codes + int(im_codes * float((x40 != 0).float().mean()))),
        "ours act-sparse 50% fp32": (lambda: k.act_sparse_mm(x50, WT), W.numel() * 2),
        "ours act-sparse 50% bf16": (lambda: k.act_sparse_mm(x50, WTb), W.numel()),
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth(repeats: int, mib: int = 512) -> dict:
    """Read (sum) and copy GB/s of a ``mib`` MiB fp32 buffer, medians."""
    src = torch.rand(mib * 2**18)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    read = statistics.median(_time(src.sum) for _ in range(repeats))
    copy = statistics.median(_time(lambda: dst.copy_(src)) for _ in range(repeats))
    return {"read_GBps": nbytes / read / 1e9, "copy_GBps": 2 * nbytes / copy / 1e9}


def run(shapes, threads, repeats: int) -> dict:
    if ops() is None:
        raise SystemExit("compress's kernels could not be built here (see the warning above)")
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "isa": ["portable", "avx2", "avx512"][int(ops().isa())],
                           "int8_isa": ["portable", "avx2", "avx512-vnni"][int(ops().int8_isa())]}, "runs": []}
    gen = torch.Generator().manual_seed(0)
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        bw = bandwidth(repeats)
        print(f"\n{n_threads} thread(s): read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s", flush=True)
        for out, n_in in shapes:
            variants = _variants(out, n_in, gen)
            times = {name: [] for name in variants}
            for fn, _ in variants.values():
                fn()  # warm-up
            for _ in range(repeats):  # round-robin
                for name, (fn, _) in variants.items():
                    times[name].append(_time(fn))
            row = {"threads": n_threads, "shape": [out, n_in], **bw, "variants": {}}
            for name, (_, nbytes) in variants.items():
                ms = statistics.median(times[name]) * 1e3
                row["variants"][name] = {"ms": ms, "bytes": nbytes, "GBps": nbytes / ms / 1e6}
            v = row["variants"]
            row["ratios"] = {
                "W4 vs fp32 F.linear": v["fp32 F.linear"]["ms"] / v["ours W4 g128"]["ms"],
                "W4 vs torch int4 (bf16 x)": v["torch int4 (bf16 x)"]["ms"] / v["ours W4 g128"]["ms"],
                "2:4+W4 vs W4": v["ours W4 g128"]["ms"] / v["ours 2:4 + W4 g128"]["ms"],
                "act50 fp32 vs fp32 F.linear": v["fp32 F.linear"]["ms"] / v["ours act-sparse 50% fp32"]["ms"],
                "act50 bf16 vs bf16 F.linear": v["bf16 F.linear"]["ms"] / v["ours act-sparse 50% bf16"]["ms"],
                "W4 input-major act50 vs W4": v["ours W4 g128"]["ms"] / v["ours W4 g128 input-major act 50%"]["ms"],
                "W4 input-major vs W4 (no zeros)": v["ours W4 g128"]["ms"] / v["ours W4 g128 input-major"]["ms"],
                "W4 g32 int8 x: share of read bandwidth": v["ours W4 g32 int8 x"]["GBps"] / bw["read_GBps"],
                "W4 g32 int8 x vs fp32 x": v["ours W4 g32 fp32 x"]["ms"] / v["ours W4 g32 int8 x"]["ms"],
                "2:4+W4 g32 int8 x vs W4 g32 int8 x": v["ours W4 g32 int8 x"]["ms"] / v["ours 2:4 + W4 g32 int8 x"]["ms"],
                "2:4+W4 g32 int8 x: share of read bandwidth": v["ours 2:4 + W4 g32 int8 x"]["GBps"] / bw["read_GBps"],
                "2:4+W4 g64 int8 x vs W4 g64 int8 x": v["ours W4 g64 int8 x"]["ms"] / v["ours 2:4 + W4 g64 int8 x"]["ms"],
                "2:4+W4 g64 int8 x vs W4 g32 int8 x": v["ours W4 g32 int8 x"]["ms"] / v["ours 2:4 + W4 g64 int8 x"]["ms"],
                "W4 g32 input-major int8 x vs W4 g32 int8 x (no zeros)":
                    v["ours W4 g32 int8 x"]["ms"] / v["ours W4 g32 input-major int8 x"]["ms"],
                "W4 g32 input-major int8 x act 40% vs W4 g32 int8 x":
                    v["ours W4 g32 int8 x"]["ms"] / v["ours W4 g32 input-major int8 x act 40%"]["ms"],
            }
            results["runs"].append(row)
            print(f"{out}x{n_in}:", flush=True)
            for name, r in v.items():
                print(f"  {name:<34} {r['ms']:8.3f} ms  {r['GBps']:6.1f} GB/s", flush=True)
            for name, r in row["ratios"].items():
                print(f"  {name:<34} {r:6.2f}x", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--shape", type=int, nargs=2, action="append", help="out in (default: the 7B shapes)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = run([tuple(s) for s in args.shape] if args.shape else SHAPES, args.threads, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
