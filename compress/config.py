"""Frozen, validated configurations. A ``Recipe`` is what gets recorded in ``compression.json``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace

_NM = re.compile(r"^(\d+):(\d+)$")
_GROUP = re.compile(r"^g(\d+)$")
_QUANT = re.compile(r"^w(\d+)(?:g(\d+))?$")


@dataclass(frozen=True)
class Pattern:
    """Which weights may be zero: a fraction of each comparison group, N:M, or whole groups of a row.

    - unstructured (``n == m == group == 0``): ``sparsity`` of the weights of each comparison group.
    - N:M: at most ``n`` non-zeros in every ``m`` consecutive weights along the input dimension of each
      output row (NVIDIA's convention); its sparsity is ``1 - n/m``.
    - ``group`` > 0 (GQSA-style): runs of ``group`` consecutive input weights of a row are kept or pruned
      together, ``sparsity`` of the runs go, ranked by the method's score summed over the run.
    """

    sparsity: float
    n: int = 0
    m: int = 0
    group: int = 0

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> "Pattern":
        """Build from the CLI's ``--sparsity`` / ``--pattern``: ``--sparsity s``, ``--pattern N:M``, or
        ``--pattern gG --sparsity s``."""
        if pattern is not None and (match := _GROUP.match(pattern.strip())):
            if sparsity is None:
                raise ValueError(f"--pattern {pattern} prunes whole groups: also give --sparsity, e.g. 0.5")
            return cls(sparsity=float(sparsity), group=int(match[1]))
        if (sparsity is None) == (pattern is None):
            raise ValueError("give exactly one of --sparsity (e.g. 0.5) or --pattern (e.g. 2:4), or both for "
                             "group sparsity (--pattern g16 --sparsity 0.5)")
        if pattern is None:
            return cls(sparsity=float(sparsity))
        match = _NM.match(pattern.strip())
        if not match:
            raise ValueError(f"--pattern {pattern!r} is neither N:M nor gG: write it like 2:4, 4:8 or g16")
        n, m = int(match[1]), int(match[2])
        return cls(sparsity=1 - n / m if m else 0.0, n=n, m=m)

    def __post_init__(self):
        if self.m or self.n:
            if not 0 < self.n < self.m:
                raise ValueError(f"--pattern {self.n}:{self.m} needs 0 < N < M: try 2:4 or 4:8")
            return
        if self.group < 0 or self.group == 1:
            raise ValueError(f"--pattern g{self.group} needs a group of at least 2 weights: try g16")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"--sparsity {self.sparsity} is outside (0, 1): pass the fraction of zeros, e.g. 0.5")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def unit(self) -> int:
        """Columns that are decided together: ``m`` for N:M, ``group`` for group sparsity, else 1."""
        return self.m or self.group or 1

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        if self.group:
            return f"{self.sparsity:.0%} in groups of {self.group}"
        return f"{self.sparsity:.0%} unstructured"


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``source`` is ``wikitext2`` (hub), a .txt/.jsonl path (seeded windows of ``seqlen``),
    or ``self``: samples the model generates from its BOS token with ``temperature`` and ``top_p``."""

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95

    def __post_init__(self):
        if self.nsamples < 1:
            raise ValueError(f"--nsamples {self.nsamples} must be at least 1")
        if self.seqlen < 2:
            raise ValueError(f"--seqlen {self.seqlen} must be at least 2")
        if self.temperature <= 0:
            raise ValueError(f"--self-temperature {self.temperature} must be positive: 1.0 samples the model as it is")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--self-top-p {self.top_p} is outside (0, 1]: 1.0 turns nucleus sampling off")


SCOPES = ("row", "matrix", "block")
ALLOCATIONS = ("uniform", "owl")
REFINEMENTS = ("dsnot", "swap")
PRECISIONS = ("auto", "fp32", "bf16")  # of calibration arithmetic: --gram-precision, --forward-precision


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: a key of ``compress.pruning.METHODS``.
        pattern: unstructured fraction or N:M.
        scope: comparison group for unstructured masks; ``None`` takes the method's paper default
            (magnitude: matrix, Wanda: row, SparseGPT: block of ``blocksize`` columns).
        blocksize: SparseGPT's lazy-update block width (columns).
        dampening: fraction of the mean Hessian diagonal added to it (SparseGPT).
        allocation: ``uniform`` (every block at ``pattern.sparsity``), ``owl`` (per-block sparsity from
            outlier ratios, ``compress.pruning.owl``) or ``file`` (given per block).
        owl_m, owl_lambda: OWL's outlier threshold (times the block's mean Wanda score) and spread.
        block_sparsity: the sparsity of each decoder block once allocated (empty: uniform); its mean is
            ``pattern.sparsity``.
        refine: refine each pruned layer's mask by prune-and-grow swaps, ``dsnot`` (``compress.pruning.dsnot``)
            or ``swap`` (ranked on the exact error, ``compress.pruning.swap``), or ``None``.
        refine_cycles, refine_var_power: proposals (DSnoT) or swaps (swap) per row at most, and DSnoT's
            variance exponent.
    """

    method: str
    pattern: Pattern
    scope: str | None = None
    blocksize: int = 128
    dampening: float = 0.01
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    block_sparsity: tuple[float, ...] = ()
    refine: str | None = None
    refine_cycles: int = 50
    refine_var_power: float = 1.0

    def __post_init__(self):
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"--scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.allocation not in (*ALLOCATIONS, "file"):
            raise ValueError(f"--allocation {self.allocation!r} is not one of {', '.join(ALLOCATIONS)} or a .json file")
        if self.allocation != "uniform" and (self.pattern.is_nm or self.pattern.group):
            raise ValueError(f"--allocation {self.allocation} varies the sparsity per block: it needs --sparsity "
                             f"alone, not --pattern {self.pattern}")
        if self.owl_m <= 0:
            raise ValueError(f"--owl-m {self.owl_m} must be positive: 5 is the paper's value")
        for s in self.block_sparsity:
            if not 0 < s < 1:
                raise ValueError(f"block sparsity {s} is outside (0, 1): each block needs a fraction of zeros, e.g. 0.6")
        mean = sum(self.block_sparsity) / len(self.block_sparsity) if self.block_sparsity else self.pattern.sparsity
        if abs(mean - self.pattern.sparsity) > 1e-6:
            raise ValueError(f"the per-block sparsities average {mean:.6g}, not --sparsity {self.pattern.sparsity}: "
                             f"pass --sparsity {mean:.6g} or fix the allocation")
        if self.refine is not None and self.refine not in REFINEMENTS:
            raise ValueError(f"--refine {self.refine!r} is not one of {', '.join(REFINEMENTS)}")
        if self.refine and self.pattern.group:
            raise ValueError(f"--refine {self.refine} swaps single weights: not with --pattern g{self.pattern.group}")
        if self.refine_cycles < 1:
            raise ValueError(f"--refine-cycles {self.refine_cycles} must be at least 1")
        if self.blocksize < 1:
            raise ValueError(f"--blocksize {self.blocksize} must be at least 1")
        if not 0 <= self.dampening < 1:
            raise ValueError(f"--dampening {self.dampening} is outside [0, 1): 0.01 is the usual value")

    def for_block(self, index: int) -> "PruneConfig":
        """This configuration as block ``index`` applies it: its own sparsity, nothing left to allocate."""
        if not self.block_sparsity:
            return self
        pattern = replace(self.pattern, sparsity=self.block_sparsity[index])
        return replace(self, pattern=pattern, allocation="uniform", block_sparsity=())




QUANT_SCALES = ("minmax", "search")


@dataclass(frozen=True)
class QuantConfig:
    """Integer weight quantization with one scale (and zero point) per ``group_size`` input weights of a row.

    Attributes:
        bits: 2..8. group_size: input weights sharing a scale; 0: one per output channel (``--quant w4``).
        symmetric: zero point fixed at 0 (codes in ``[-2^(b-1), 2^(b-1) - 1]``); else a per-group zero point.
        method: ``rtn`` (round to nearest) or ``gptq`` (OBS error compensation with the shared Hessian).
        actorder: GPTQ visits columns by decreasing Hessian diagonal (static groups: the layout is unchanged).
        dampening, blocksize: GPTQ's, as SparseGPT's.
        scale: ``minmax`` (each group's extremes on the grid's edges) or ``search`` (``quant.grid``).
        hessian_shrink: GPTQ's Hessian is ``(1 - a) H + a diag(H)`` (``quant.gptq``); 0: plain GPTQ.
    """

    bits: int
    group_size: int = 0
    symmetric: bool = True
    method: str = "gptq"
    actorder: bool = True
    dampening: float = 0.01
    blocksize: int = 128
    scale: str = "search"
    hessian_shrink: float = 0.5

    @classmethod
    def parse(cls, spec: str, **options) -> "QuantConfig":
        """``w4g64`` -> 4 bits, groups of 64; ``w8`` -> 8 bits per output channel."""
        match = _QUANT.match(spec.strip().lower())
        if not match:
            raise ValueError(f"--quant {spec!r} is not wBgG: write it like w4g64 (4 bits, groups of 64) or w8 (per channel)")
        if match[2] is not None and int(match[2]) < 2:  # group_size 0 means per channel: spelled w4, never w4g0
            raise ValueError(f"--quant {spec!r}: a group holds at least 2 weights; write w{match[1]} for one scale "
                             f"per output channel, or e.g. w{match[1]}g64")
        return cls(bits=int(match[1]), group_size=int(match[2] or 0), **options)

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"--quant w{self.bits}: bits must be in 2..8, e.g. w4g64")
        if self.group_size < 0 or self.group_size == 1:
            raise ValueError(f"--quant group size {self.group_size} must be at least 2 (or omitted for per-channel)")
        from compress import quant  # the registry (imported here: it imports this module)
        quant.get(self.method)
        if not 0 <= self.dampening < 1:
            raise ValueError(f"--dampening {self.dampening} is outside [0, 1): 0.01 is the usual value")
        if self.scale not in QUANT_SCALES:
            raise ValueError(f"--quant-scale {self.scale!r} is not one of {', '.join(QUANT_SCALES)}")
        if not 0 <= self.hessian_shrink <= 1:
            raise ValueError(f"--quant-hessian-shrink {self.hessian_shrink} is outside [0, 1]: 0.5 is the default")

    def __str__(self) -> str:
        group = f"g{self.group_size}" if self.group_size else " per-channel"
        return f"{self.method} w{self.bits}{group} {'sym' if self.symmetric else 'asym'}"


ACT_SCALES = ("token", "none")


@dataclass(frozen=True)
class ActConfig:
    """Activation-threshold sparsity: inputs of targeted linears below a calibrated threshold are zeroed.

    Attributes:
        sparsity: target fraction of zeroed input activations per targeted linear.
        method: ``teal`` (one threshold on |x| per linear input, Liu et al. 2024), ``chess`` (channel-wise
            thresholds on MLP inputs, one threshold on attention inputs, He et al. 2024), ``wina`` (one
            threshold on |x_j|·‖W[:, j]‖₂, the weight-informed score, Chen et al. 2025).
        targets: regular expressions of linears to sparsify (``re.search`` on full names); empty: all.
        per_layer: full linear name -> its own target sparsity (overrides ``sparsity``).
        prefill: ``sparse`` (every token, as in perplexity protocols) or ``dense`` (only single-token
            decode steps are sparsified).
        positions: position bands with their own thresholds (``activations.positions``): ``auto``, ``off``
            (one threshold set per linear, as the papers) or edges like ``64,256``; ``resolved`` fixes them
            for a calibration length.
        scale: ``token``: a threshold is relative to each token's input RMS (``|x_j| < t_j · rms(x)`` is
            zeroed), so inputs whose scale drifts with position or context keep the target; ``none``: absolute
            thresholds, as the papers.
    """

    sparsity: float
    method: str = "teal"
    targets: tuple[str, ...] = ()
    per_layer: dict = field(default_factory=dict)
    prefill: str = "sparse"
    positions: str = "auto"
    scale: str = "token"

    def __post_init__(self):
        for name, s in [("--act-sparsity", self.sparsity), *self.per_layer.items()]:
            if not 0 < s < 1:
                raise ValueError(f"activation sparsity {s} for {name} is outside (0, 1): e.g. 0.5")
        from compress.activations import methods  # the registry

        methods.get(self.method)
        if self.prefill not in ("sparse", "dense"):
            raise ValueError(f"--act-prefill {self.prefill!r} is not sparse or dense")
        if self.scale not in ACT_SCALES:
            raise ValueError(f"--act-scale {self.scale!r} is not one of {', '.join(ACT_SCALES)}")
        self.edges(1 << 62)  # a malformed --act-positions fails here, before the model loads
        for expr in self.targets:
            try:
                re.compile(expr)
            except re.error as err:
                raise ValueError(f"--act-targets {expr!r} is not a regular expression ({err})") from err

    def edges(self, seqlen: int) -> tuple[int, ...]:
        """The position bands' edges for ``seqlen``-token calibration windows (ValueError naming the fix)."""
        from compress.activations.positions import band_edges

        return band_edges(self.positions, seqlen)

    def resolved(self, seqlen: int) -> "ActConfig":
        """This config with its position bands written out for ``seqlen``-token calibration windows."""
        return replace(self, positions=",".join(map(str, self.edges(seqlen))) or "off")

    def target_for(self, name: str) -> float | None:
        """The target sparsity of linear ``name``, or ``None`` if it is not targeted."""
        if name in self.per_layer:
            return self.per_layer[name]
        if self.targets and not any(re.search(expr, name) for expr in self.targets):
            return None
        return self.sparsity

    def __str__(self) -> str:
        return f"{self.method} activations {self.sparsity:.0%}"


@dataclass(frozen=True)
class Recipe:
    """Everything done to a model: pruning and/or quantization of every linear not matched by ``ignore``.

    Attributes:
        ignore: regular expressions; a linear whose full name matches one (``re.search``) is left as it is.
        quant_lm_head: also quantize the output projection (round to nearest on ``quant``'s grid: it has no
            calibrated input statistics here); an input embedding tied to it shares the quantized weights.
        gram_precision: products of the calibration Gram matrix (the Hessian): ``auto``, ``fp32`` or ``bf16``
            (``calibration.stats``); the pipeline resolves ``auto`` for its device.
        forward_precision: the calibration forwards that make each block's inputs, ``auto``, ``fp32`` or
            ``bf16`` (autocast: matmuls and attention in bf16, the residual stream in the model's dtype;
            ``pipeline``); resolved like ``gram_precision``.
    """

    prune: PruneConfig | None = None
    quant: QuantConfig | None = None
    ignore: tuple[str, ...] = ()
    calib: CalibConfig = field(default_factory=CalibConfig)
    act: ActConfig | None = None
    quant_lm_head: bool = False
    gram_precision: str = "auto"
    forward_precision: str = "auto"

    def __post_init__(self):
        for option, value in (("--gram-precision", self.gram_precision), ("--forward-precision", self.forward_precision)):
            if value not in PRECISIONS:
                raise ValueError(f"{option} {value!r} is not one of {', '.join(PRECISIONS)}")
        if self.prune is None and self.quant is None and self.act is None:
            raise ValueError("nothing to do: give --method with --sparsity/--pattern, --quant, or --act-sparsity")
        if self.quant_lm_head and self.quant is None:
            raise ValueError("--quant-lm-head quantizes lm_head on --quant's grid: add --quant (e.g. w4g64)")
        from compress import quant  # the registry says which pruning method GPTQ runs one pass with

        if (self.prune is not None and self.prune.refine and self.quant is not None
                and self.prune.method == quant.get(self.quant.method).joint_with):
            raise ValueError(f"--refine {self.prune.refine} refines a mask before quantization, but SparseGPT with GPTQ "
                             f"prunes and quantizes in one pass: use --quant-method rtn, or drop --refine")
        for expr in self.ignore:
            try:
                re.compile(expr)
            except re.error as err:
                raise ValueError(f"--ignore {expr!r} is not a regular expression ({err}): e.g. 'mlp\\.down_proj'") from err

    def __str__(self) -> str:
        parts = []
        if self.prune:
            allocation = None if self.prune.allocation == "uniform" else self.prune.allocation
            parts.append(" ".join(p for p in (self.prune.method, str(self.prune.pattern), allocation, self.prune.refine) if p))
        return " + ".join(parts + [str(part) for part in (self.quant, self.act) if part])

    def for_block(self, index: int) -> "Recipe":
        """The recipe block ``index`` is compressed with (its own sparsity under a non-uniform allocation)."""
        if self.prune is None or not self.prune.block_sparsity:
            return self
        return replace(self, prune=self.prune.for_block(index))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """Inverse of ``to_dict``; unknown keys are errors."""
        _check_keys(cls, data, "recipe")
        prune_cfg = None
        if data.get("prune") is not None:
            prune = dict(data["prune"])
            _check_keys(PruneConfig, prune, "recipe.prune")
            if not isinstance(prune.get("pattern"), dict):
                raise ValueError("recipe.prune needs a pattern, e.g. pattern: {sparsity: 0.5} or {sparsity: 0.5, n: 2, m: 4}")
            pattern = prune.pop("pattern")
            _check_keys(Pattern, pattern, "recipe.prune.pattern")
            prune["block_sparsity"] = tuple(prune.get("block_sparsity", ()))
            prune_cfg = PruneConfig(pattern=Pattern(**pattern), **prune)
        calib = data.get("calib", {})
        _check_keys(CalibConfig, calib, "recipe.calib")
        quant = data.get("quant")
        if quant is not None:
            _check_keys(QuantConfig, quant, "recipe.quant")
            quant = QuantConfig(**{"scale": "minmax", "hessian_shrink": 0.0, **quant})  # recipes from before both
        act = data.get("act")
        if act is not None:
            _check_keys(ActConfig, act, "recipe.act")
            # recipes from before position bands and token scales had one absolute threshold set per linear
            act = ActConfig(**{"positions": "off", "scale": "none", **act, "targets": tuple(act.get("targets", ()))})
        return cls(prune=prune_cfg, quant=quant, ignore=tuple(data.get("ignore", ())), calib=CalibConfig(**calib), act=act,
                   quant_lm_head=bool(data.get("quant_lm_head", False)),
                   # what recipes did before the choices existed
                   gram_precision=data.get("gram_precision", "fp32"), forward_precision=data.get("forward_precision", "fp32"))


def _check_keys(cls, data: dict, where: str) -> None:
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown)}")
