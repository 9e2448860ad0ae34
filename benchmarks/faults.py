"""Fault injection (issue 22): kill -9 a SmolLM2-135M SparseGPT run at random moments, resume each, and compare
the weights byte for byte with an uninterrupted run's.

One uninterrupted run first (its wall time T). Then, per kill: the same command is started, sent SIGKILL at a
moment drawn uniformly from (0, T) (seeded, so the moments are reproducible), and rerun with ``--resume``. What
the kill left behind is recorded (nothing yet, a resume state at block k, or a finished run not yet in place),
and every weight file of the resumed output is compared with the uninterrupted run's. Runs one at a time.

    python benchmarks/faults.py --work bench-faults --json faults.json [--kills 5 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_DATA, prepare  # noqa: E402


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _left_behind(out: Path) -> str:
    """What a killed run left: read from its partial folder's resume state."""
    from compress import outputs

    if out.is_dir() and not outputs.partial_folder(out).exists():
        return "output complete and in place"
    state = outputs.read_state(out)
    if state is None:
        return "no resume state yet" if outputs.partial_folder(out).exists() else "nothing (killed before the claim)"
    if state.get("finished"):
        return "finished run, not yet moved into place"
    return f"resume state at block {state['state']['next_block']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-faults"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--save-every", type=float, default=5.0, help="compress prune --save-every (seconds)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    _, dense_dir, _ = prepare(args.work, args.data, args.nsamples, args.seqlen)
    command = [sys.executable, "-m", "compress.cli", "prune", str(dense_dir), "--method", "sparsegpt", "--sparsity",
               "0.5", "--calib", str(args.data / "valid.txt"), "--nsamples", str(args.nsamples), "--seqlen",
               str(args.seqlen), "--device", "cpu", "--save-every", str(args.save_every)]

    whole = args.work / "whole"
    shutil.rmtree(whole, ignore_errors=True)
    start = time.perf_counter()
    with open(args.work / "whole.log", "w") as log:
        subprocess.run([*command, "--out", str(whole)], stdout=log, stderr=subprocess.STDOUT, check=True)
    total = time.perf_counter() - start
    reference = _weights(whole)
    print(f"uninterrupted run: {total:.1f} s, {len(reference)} weight files", flush=True)

    rng = random.Random(args.seed)
    rows = []
    for k in range(args.kills):
        out = args.work / f"killed-{k}"
        for leftover in (out, out.with_name(f".{out.name}.partial")):
            shutil.rmtree(leftover, ignore_errors=True)
        moment = rng.uniform(0, total)
        with open(args.work / f"killed-{k}.log", "w") as log:
            child = subprocess.Popen([*command, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)
            try:
                child.wait(timeout=moment)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                child.wait()
        killed = child.returncode == -signal.SIGKILL
        left = _left_behind(out)
        start = time.perf_counter()
        if not out.is_dir() or out.with_name(f".{out.name}.partial").exists():
            with open(args.work / f"resumed-{k}.log", "w") as log:
                subprocess.run([*command, "--out", str(out), "--resume"], stdout=log, stderr=subprocess.STDOUT, check=True)
        resumed = time.perf_counter() - start
        identical = _weights(out) == reference
        strays = sorted(p.name for p in args.work.iterdir() if p.name.startswith(f".{out.name}"))
        rows.append({"kill": k, "at_seconds": round(moment, 1), "killed": killed, "left": left,
                     "resume_seconds": round(resumed, 1), "byte_identical": identical, "stray": strays})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n| kill | at (s of {total:.0f}) | what it left | resume (s) | weights byte-identical | stray files |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kill']} | {r['at_seconds']} | {r['left']} | {r['resume_seconds']} | "
              f"{'yes' if r['byte_identical'] else 'NO'} | {', '.join(r['stray']) or 'none'} |")
    result = {"protocol": {k: str(v) for k, v in vars(args).items()}, "uninterrupted_seconds": round(total, 1),
              "weight_files": len(reference), "kills": rows}
    (args.json or args.work / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    if not all(r["byte_identical"] and not r["stray"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
