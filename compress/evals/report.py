"""Compare evaluation results (``compress eval --json``): a markdown table with deltas vs dense, and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compress.config import Recipe


@dataclass
class Run:
    """One evaluated model, as the report sees it."""

    name: str
    method: str  # "dense", or the recipe's methods, e.g. "wanda + gptq w4"
    sparsity: float  # of the compressed linears' weights
    bits: float | None  # bits of the quantized weights, None when not quantized
    ppl: float | None
    accuracy: float | None  # mean of the tasks' acc
    tasks: dict[str, float]
    weights_format: str = "dense"  # how the folder stores its weights: dense, compressed-tensors or packed
    ppl_protocol: dict | None = None  # text (its digest where recorded), seqlen, windows
    zero_shot_protocol: dict | None = None  # tasks, limit, few-shot examples

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"


def read_run(path: Path) -> Run:
    """Raises ValueError on a file that is not a ``compress eval --json`` result."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable JSON result ({err}): pass files written by compress eval --json") from err
    if "model" not in data or not ({"ppl", "zero_shot"} & set(data)):
        raise ValueError(f"{str(path)!r} has no perplexity or zero-shot result: pass files written by compress eval --json")
    meta = data.get("compression") or {}
    try:
        recipe = Recipe.from_dict(meta["recipe"]) if meta.get("recipe") else None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r}: its compression recipe is not readable ({err})") from err
    parts = []
    if recipe is not None and recipe.prune:
        pattern = recipe.prune.pattern
        parts.append(f"{recipe.prune.method} {f'{pattern.n}:{pattern.m}' if pattern.is_nm else 'unstructured'}")
    if recipe is not None and recipe.quant:
        parts.append(f"{recipe.quant.method} w{recipe.quant.bits}")
    if recipe is not None and recipe.act:
        parts.append(f"{recipe.act.method} act")
    layers = (meta.get("report") or {}).get("layers", [])
    bits = {layer.get("bits") for layer in layers} - {None}
    stored = data.get("gguf") or {}  # a .gguf file: its GGML types, e.g. a llama.cpp Q4_0 file
    main_type = max(stored.get("types", {}).items(), key=lambda kv: kv[1], default=(None, 0))[0]
    if main_type and recipe is None and main_type not in ("F32", "F16", "BF16"):
        parts.append(f"gguf {main_type}")
    zs = data.get("zero_shot") or {}
    zs_protocol = zs.get("protocol") or {}
    return Run(name=Path(path).stem, method=" + ".join(parts) or "dense",
               sparsity=(meta.get("report") or {}).get("sparsity", stored.get("sparsity", 0.0)),
               bits=max(bits) if bits else (round(stored["bits_per_weight"], 2) if parts and stored else None),
               ppl=data.get("ppl"), accuracy=zs.get("mean_accuracy"),
               tasks={t: m["acc"] for t, m in (zs.get("tasks") or {}).items() if "acc" in m},
               weights_format=(meta.get("format") or "gguf") + f" {main_type}" if main_type else meta.get("format") or "dense",
               ppl_protocol={"text": data.get("text_sha256") or data.get("source"), "seqlen": data.get("seqlen"),
                             "windows": data.get("windows")} if data.get("ppl") is not None else None,
               zero_shot_protocol={"tasks": sorted(zs.get("tasks") or {}), "limit": zs_protocol.get("limit"),
                                   "num_fewshot": zs_protocol.get("num_fewshot")} if zs else None)


def protocol_differences(run: Run, dense: Run) -> list[str]:
    """How ``run`` was measured unlike ``dense`` (empty: every metric both have is comparable), e.g.
    ``["perplexity windows 20 vs 50"]``."""
    found = []
    for label, mine, theirs in (("perplexity", run.ppl_protocol, dense.ppl_protocol),
                                ("zero-shot", run.zero_shot_protocol, dense.zero_shot_protocol)):
        if mine is None or theirs is None:
            continue
        for key in mine:
            if mine[key] != theirs.get(key):
                shown = "another text" if key == "text" else f"{mine[key]} vs {theirs.get(key)}"
                found.append(f"{label} {key} {shown}")
    return found


def comparable(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, list[str]]]]:
    """Split ``runs`` into those measured as the (first) dense run was, dense included, and the others with
    what differs; with no dense run every run is comparable (no deltas are shown then)."""
    dense = next((r for r in runs if r.is_dense), None)
    if dense is None:
        return list(runs), []
    same, other = [], []
    for r in runs:
        if differs := protocol_differences(r, dense):
            other.append((r, differs))
        else:
            same.append(r)
    return same, other


def markdown(runs: list[Run]) -> str:
    """Dense first; each compressed run with its delta vs the (first) dense run. Runs measured under another
    protocol (text, window length or count, tasks, limit) go to a second table, without deltas, that names
    the difference."""
    same, other = comparable(runs)
    same = sorted(same, key=lambda r: (not r.is_dense, r.method, r.sparsity))
    dense = next((r for r in same if r.is_dense), None)
    tasks = sorted({t for r in runs for t in r.tasks})
    head = ["run", "method", "format", "sparsity", "bits", "ppl", "Δppl", "mean acc", "Δacc", *tasks]

    def fmt(v, spec=".2f"):
        return "" if v is None else format(v, spec)

    def delta(value, base, spec):
        return "" if value is None or base is None or dense is None else format(value - base, "+" + spec)

    def row(r: Run, base: Run | None) -> str:
        cells = [r.name, r.method, r.weights_format, fmt(r.sparsity, ".3f"), fmt(r.bits, "g"), fmt(r.ppl),
                 delta(r.ppl, base.ppl if base else None, ".2f"), fmt(r.accuracy, ".4f"),
                 delta(r.accuracy, base.accuracy if base else None, ".4f"), *[fmt(r.tasks.get(t), ".4f") for t in tasks]]
        return "| " + " | ".join(cells) + " |"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *(row(r, dense) for r in same)]
    if other:
        lines += ["", f"Measured under another protocol than the dense run {dense.name!r}: not comparable with it, "
                      f"no deltas.", "", "| " + " | ".join([*head, "differs in"]) + " |", "|" + "---|" * (len(head) + 1)]
        lines += [row(r, None)[:-1] + f"| {'; '.join(differs)} |" for r, differs in other]
    return "\n".join(lines)


def plot(runs: list[Run], out: Path) -> list[Path]:
    """``ppl.png`` and ``accuracy.png``: metric vs weight sparsity, one line per method (dense as a reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs, _ = comparable(runs)  # one protocol per plot
    dense = next((r for r in runs if r.is_dense), None)
    for attr, label, file in (("ppl", "perplexity", "ppl.png"), ("accuracy", "mean accuracy", "accuracy.png")):
        points = [r for r in runs if getattr(r, attr) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for method in sorted({r.method for r in points if not r.is_dense}):
            line = sorted((r for r in points if r.method == method), key=lambda r: r.sparsity)
            if dense is not None and getattr(dense, attr) is not None:
                line = [dense, *line]  # every method starts from the dense model
            ax.plot([r.sparsity for r in line], [getattr(r, attr) for r in line], marker="o", label=method)
        if dense is not None and getattr(dense, attr) is not None:
            ax.axhline(getattr(dense, attr), color="black", linestyle="--", label="dense")
        ax.set_xlabel("weight sparsity of the compressed linears")
        ax.set_ylabel(label)
        if attr == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file)
        plt.close(fig)
        written.append(out / file)
    return written


MARKER = "report.json"  # marks a folder compress report wrote (what --overwrite may replace)


def write(results: list[Path], out: Path, overwrite: bool = False) -> tuple[str, list[Path]]:
    """``compress report``: read ``results`` (``compress eval --json`` files), write ``report.md``, the plots
    and ``report.json`` to the folder ``out`` (claimed and renamed into place as every output).

    Returns:
        The markdown table and the plots written.
    """
    from compress import outputs

    runs = [read_run(path) for path in results]
    with outputs.claim(Path(out), overwrite, inputs=tuple(map(str, results)), marker=MARKER) as target:
        table = markdown(runs)
        with target.writing() as tmp:
            (tmp / "report.md").write_text(table + "\n")
            plots = plot(runs, tmp)
            (tmp / MARKER).write_text(json.dumps({"results": [str(p) for p in results], "versions": outputs.versions()},
                                                 indent=2) + "\n")
    return table, [Path(out) / p.name for p in plots]
