"""Frozen, validated configurations. A ``Recipe`` is what gets recorded in ``compression.json``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """Which weights may be zero: a fraction of each comparison group (``n == m == 0``) or N:M.

    N:M means at most ``n`` non-zeros in every ``m`` consecutive weights along the input dimension of each
    output row (NVIDIA's convention); its sparsity is ``1 - n/m``.
    """

    sparsity: float
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> "Pattern":
        """Build from the CLI's ``--sparsity`` / ``--pattern`` (exactly one of them)."""
        if (sparsity is None) == (pattern is None):
            raise ValueError("give exactly one of --sparsity (e.g. 0.5) or --pattern (e.g. 2:4)")
        if pattern is None:
            return cls(sparsity=float(sparsity))
        match = _NM.match(pattern.strip())
        if not match:
            raise ValueError(f"--pattern {pattern!r} is not N:M: write it like 2:4 or 4:8")
        n, m = int(match[1]), int(match[2])
        return cls(sparsity=1 - n / m if m else 0.0, n=n, m=m)

    def __post_init__(self):
        if self.m or self.n:
            if not 0 < self.n < self.m:
                raise ValueError(f"--pattern {self.n}:{self.m} needs 0 < N < M: try 2:4 or 4:8")
        elif not 0 < self.sparsity < 1:
            raise ValueError(f"--sparsity {self.sparsity} is outside (0, 1): pass the fraction of zeros, e.g. 0.5")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.0%} unstructured"


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``source`` is ``wikitext2`` (hub) or a .txt/.jsonl path; seeded windows of ``seqlen``."""

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.nsamples < 1:
            raise ValueError(f"--nsamples {self.nsamples} must be at least 1")
        if self.seqlen < 2:
            raise ValueError(f"--seqlen {self.seqlen} must be at least 2")


SCOPES = ("row", "matrix", "block")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: a key of ``compress.prune.METHODS``.
        pattern: unstructured fraction or N:M.
        scope: comparison group for unstructured masks; ``None`` takes the method's paper default
            (magnitude: matrix, Wanda: row, SparseGPT: block of ``blocksize`` columns).
        blocksize: SparseGPT's lazy-update block width (columns).
        dampening: fraction of the mean Hessian diagonal added to it (SparseGPT).
        ignore: regular expressions; a linear whose full name matches one (``re.search``) stays dense.
    """

    method: str
    pattern: Pattern
    scope: str | None = None
    blocksize: int = 128
    dampening: float = 0.01
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"--scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.blocksize < 1:
            raise ValueError(f"--blocksize {self.blocksize} must be at least 1")
        if not 0 <= self.dampening < 1:
            raise ValueError(f"--dampening {self.dampening} is outside [0, 1): 0.01 is the usual value")
        for expr in self.ignore:
            try:
                re.compile(expr)
            except re.error as err:
                raise ValueError(f"--ignore {expr!r} is not a regular expression ({err}): e.g. 'mlp\\.down_proj'") from err


@dataclass(frozen=True)
class Recipe:
    prune: PruneConfig
    calib: CalibConfig = field(default_factory=CalibConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """Inverse of ``to_dict``; unknown keys are errors."""
        _check_keys(cls, data, "recipe")
        prune = dict(data["prune"])
        _check_keys(PruneConfig, prune, "recipe.prune")
        pattern = prune.pop("pattern")
        _check_keys(Pattern, pattern, "recipe.prune.pattern")
        prune["ignore"] = tuple(prune.get("ignore", ()))
        calib = data.get("calib", {})
        _check_keys(CalibConfig, calib, "recipe.calib")
        return cls(prune=PruneConfig(pattern=Pattern(**pattern), **prune), calib=CalibConfig(**calib))


def _check_keys(cls, data: dict, where: str) -> None:
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown)}")
