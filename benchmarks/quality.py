"""Quality and cost of compress vs llm-compressor on SmolLM2-135M: perplexity, wall time, peak RSS.

Protocol (issue 2): calibration 128 x 512 tokens from WikiText-2 valid.txt (seed 0); perplexity on test.txt,
windows of 1024 tokens, first 50 windows, fp32. Both tools get the very same calibration token windows.
Both tools prune the same dense fp32 safetensors folder (the GGUF dequantized once). The peer's script
runs with ``python -P`` (no script folder on ``sys.path``), so no file of this folder shadows a package it imports
(the GEMV benchmark is ``gemv.py``, not ``kernels.py``, for the ``kernels`` package transformers imports). Each
prune runs as its own process (``compress prune`` and ``benchmarks/llmcompressor_run.py`` in the peer's
venv), one at a time; wall time, and peak RSS from GNU time on that process (see ``timed``). With
``--repeat N`` each pair runs N times, alternating the tools (so a slow spell of this shared machine hits both),
and the table gives the median seconds and the median peak RSS; every run's figures, with the CPU time the
hypervisor stole meanwhile, stay in the JSON.

    python benchmarks/quality.py --llmc-python /path/to/llmc-venv/bin/python --work bench-work --json quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RUNS = [("magnitude", "0.5"), ("magnitude", "2:4"), ("wanda", "0.5"), ("wanda", "2:4"), ("sparsegpt", "0.5"), ("sparsegpt", "2:4")]
PEER_METHODS = {"wanda", "sparsegpt"}  # llm-compressor's magnitude modifier is a no-op in oneshot


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` alone; return its wall seconds and peak RSS (MiB).

    The peak comes from GNU time's report on the command itself (``%M``), not from ``wait4`` on our child:
    Linux carries a process's RSS high-water mark across ``exec``, so a child forked from this script would
    report at least this script's own RSS at fork time (it holds the models it evaluated, ~1.5 GB).
    """
    time_bin = shutil.which("time") or "/usr/bin/time"
    if not Path(time_bin).is_file():
        raise RuntimeError("GNU time (/usr/bin/time) is needed to measure a command's own peak RSS: apt install time")
    steal = _steal_seconds()
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call([time_bin, "-f", "PEAK_RSS_KB=%M", *cmd], stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{cmd[:3]} failed, see {log}")
    peak_kb = int(log.read_text().rsplit("PEAK_RSS_KB=", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_mib": peak_kb / 1024, "steal_seconds": _steal_seconds() - steal}


def _steal_seconds() -> float:
    """CPU seconds the hypervisor gave to others, all cores (``/proc/stat``; 0 where there is none)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def summarize(runs: list[dict]) -> dict:
    """The median seconds and peak RSS of repeated runs, with the runs themselves."""
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs), "runs": runs}


def slug(method: str, pattern: str) -> str:
    return f"{method}-{pattern.replace(':', 'of')}"


def prepare(work: Path, data: Path, nsamples: int, seqlen: int) -> tuple[str, Path, Path]:
    """The GGUF path, a dense HF folder of it (for the peer), and the calibration tokens file."""
    from compress import assets, models
    from compress.calibration.data import calibration_batches
    from compress.config import CalibConfig

    gguf = str(assets.smollm2_gguf())
    dense_dir, calib = work / "dense", work / f"calib_{nsamples}x{seqlen}.pt"
    if not dense_dir.is_dir() or not calib.is_file():
        model, tok = models.load(gguf)
        if not dense_dir.is_dir():
            model.save_pretrained(dense_dir)
            tok.save_pretrained(dense_dir)
        tokens, manifest = calibration_batches(tok, CalibConfig(str(data / "valid.txt"), nsamples, seqlen, 0))
        torch.save(tokens, calib)
        (work / "calib_manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2))
    return gguf, dense_dir, calib


def evaluate(folder: str, data: Path, seqlen: int, limit: int) -> float:
    from compress import models
    from compress.evals.perplexity import perplexity

    model, tok = models.load(folder)
    return perplexity(model, tok, str(data / "test.txt"), seqlen=seqlen, limit=limit).ppl


def protocol_parser(doc: str, peer: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark shares: where to work, the data, and the issue 2 protocol's numbers."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "results" / "quality")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    if peer:
        ap.add_argument("--llmc-python", help="python of a venv with llmcompressor installed; omit to skip the peer")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=50)
    return ap


def main() -> None:
    ap = protocol_parser(__doc__)
    ap.add_argument("--only", nargs="*", help="method-pattern slugs to run, e.g. wanda-0.5 sparsegpt-2of4")
    ap.add_argument("--reuse", action="store_true", help="reuse finished outputs (their recorded timings) in --work")
    ap.add_argument("--json", type=Path, help="write the results here (default: WORK/quality.json)")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="only print a markdown table of a results JSON")
    ap.add_argument("--no-ppl", action="store_true", help="time the prunes only (perplexities are reported as nan)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each prune, alternating the tools (medians reported)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["results"]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    _, dense_dir, calib = prepare(args.work, args.data, args.nsamples, args.calib_seqlen)
    ppl = (lambda *_: float("nan")) if args.no_ppl else evaluate

    results = {"dense": {"ppl": ppl(str(dense_dir), args.data, args.eval_seqlen, args.limit)}}
    print(f"dense ppl {results['dense']['ppl']:.2f}", flush=True)
    compress_cmd = [sys.executable, "-m", "compress.cli"]  # the current directory's package first (a worktree)
    for method, pattern in RUNS:
        name = slug(method, pattern)
        if args.only and name not in args.only:
            continue
        row = results[name] = {"method": method, "pattern": pattern}
        flag = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
        ours, peer = args.work / f"compress-{name}", args.work / f"llmc-{name}"
        with_peer = bool(args.llmc_python) and method in PEER_METHODS
        ours_cmd = [*compress_cmd, "prune", str(dense_dir), "--method", method, *flag, "--calib", str(args.data / "valid.txt"),
                    "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--device", "cpu",
                    "--out", str(ours), "--overwrite"]
        peer_cmd = [args.llmc_python, "-P", str(ROOT / "benchmarks" / "llmcompressor_run.py"), str(dense_dir),
                    str(calib), method, pattern, str(peer)]
        ours_runs, peer_runs = [], []
        shutil.rmtree(args.work / f".compress-{name}.partial", ignore_errors=True)  # a killed benchmark's unfinished run
        for k in range(args.repeat):
            if not (args.reuse and (ours / "timing.json").is_file()):
                ours_runs.append(timed(ours_cmd, args.work / f"compress-{name}.log"))
                (ours / "timing.json").write_text(json.dumps(summarize(ours_runs)))
            if with_peer and not (args.reuse and (peer / "process_timing.json").is_file()):
                peer_runs.append(timed(peer_cmd, args.work / f"llmc-{name}.log"))
                (peer / "process_timing.json").write_text(json.dumps(summarize(peer_runs)))
            if ours_runs and (peer_runs or not with_peer):
                last = [f"compress {ours_runs[-1]['seconds']:.0f} s"] + ([f"llm-compressor {peer_runs[-1]['seconds']:.0f} s"]
                                                                       if peer_runs else [])
                print(f"{name} run {k + 1}/{args.repeat}: {', '.join(last)}", flush=True)
        row["compress"] = {**json.loads((ours / "timing.json").read_text()),
                           "ppl": ppl(str(ours), args.data, args.eval_seqlen, args.limit)}
        if with_peer:
            row["llmcompressor"] = {**json.loads((peer / "process_timing.json").read_text()),
                                    "oneshot_seconds": json.loads((peer / "timing.json").read_text())["oneshot_seconds"],
                                    "ppl": ppl(str(peer), args.data, args.eval_seqlen, args.limit)}
        print(format_row(name, row), flush=True)
    out = args.json or args.work / "quality.json"
    out.write_text(json.dumps({"protocol": vars(args) | {"work": str(args.work), "data": str(args.data),
                                                          "json": str(out)}, "results": results}, indent=2))
    print_table(results)


def format_row(name: str, row: dict) -> str:
    ours, peer = row["compress"], row.get("llmcompressor")
    cells = [f"{name:<16}", f"{ours['ppl']:>9.2f}", f"{ours['seconds']:>7.0f}s", f"{ours['peak_rss_mib']:>7.0f}M"]
    if peer:
        cells += [f"{peer['ppl']:>9.2f}", f"{peer['seconds']:>7.0f}s", f"{peer['peak_rss_mib']:>7.0f}M",
                  f"{ours['ppl'] / peer['ppl']:>8.3f}", f"{ours['seconds'] / peer['seconds']:>7.2f}",
                  f"{ours['peak_rss_mib'] / peer['peak_rss_mib']:>6.2f}"]
    return " ".join(cells)


def print_table(results: dict) -> None:
    print(f"\n{'run':<16} {'ppl':>9} {'time':>8} {'rss':>8} {'llmc ppl':>9} {'time':>8} {'rss':>8} "
          f"{'ppl x':>8} {'time x':>7} {'rss x':>6}")
    print(f"{'dense':<16} {results['dense']['ppl']:>9.2f}")
    for name, row in results.items():
        if name != "dense":
            print(format_row(name, row))


def markdown(results: dict) -> str:
    lines = ["| run | compress ppl | llm-compressor ppl | ppl ratio | compress s | llm-compressor s | time ratio "
             "| compress RSS MiB | llm-compressor RSS MiB | RSS ratio |", "|" + "---|" * 10,
             f"| dense | {results['dense']['ppl']:.2f} | | | | | | | | |"]
    for name, row in results.items():
        if name == "dense":
            continue
        ours, peer = row["compress"], row.get("llmcompressor")
        if peer:
            lines.append(f"| {name} | {ours['ppl']:.2f} | {peer['ppl']:.2f} | {ours['ppl'] / peer['ppl']:.3f} "
                         f"| {ours['seconds']:.0f} | {peer['seconds']:.0f} | {ours['seconds'] / peer['seconds']:.2f} "
                         f"| {ours['peak_rss_mib']:.0f} | {peer['peak_rss_mib']:.0f} "
                         f"| {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f} |")
        else:
            lines.append(f"| {name} | {ours['ppl']:.2f} | (no-op in oneshot) | | {ours['seconds']:.0f} | | "
                         f"| {ours['peak_rss_mib']:.0f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
