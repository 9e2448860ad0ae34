"""Recipes from the command line and from files, one way each.

``compress prune`` flags and a ``Recipe`` map onto each other field by field (``from_flags`` / ``to_flags``):
``--blocksize`` and ``--dampening`` drive pruning and quantization alike, ``--allocation FILE`` and
``--act-sparsity-file FILE`` read their per-block / per-linear values into the recipe. A recipe file
(``--recipe``, YAML or JSON) is ``Recipe.to_dict``'s form, or a whole compression.json (its ``recipe`` and
``format``), so ``compress prune MODEL --recipe OUT/compression.json`` reproduces a run. Flags given on the
command line override the file's fields.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.config import ActConfig, CalibConfig, Pattern, PruneConfig, QuantConfig, Recipe

DEFAULTS = {  # what compress prune takes when neither a flag nor a recipe file says otherwise
    "method": None, "sparsity": None, "pattern": None, "scope": None, "blocksize": 128, "dampening": 0.01,
    "allocation": "uniform", "block_sparsity": (), "owl_m": 5.0, "owl_lambda": 0.08, "refine": None,
    "refine_cycles": 50, "refine_var_power": 1.0,
    "quant": None, "quant_sym": True, "quant_method": "gptq", "quant_actorder": True, "quant_scale": "search",
    "quant_hessian_shrink": 0.5, "quant_lm_head": False,
    "act_sparsity": None, "act_method": "teal", "act_targets": (), "act_sparsity_file": None, "act_per_layer": {},
    "act_prefill": "sparse", "act_positions": "auto", "act_scale": "token",
    "calib": "wikitext2", "nsamples": 128, "seqlen": 2048, "seed": 0, "self_temperature": 1.0, "self_top_p": 0.95,
    "ignore": (), "gram_precision": "auto", "forward_precision": "auto",
}


def from_flags(flags: dict) -> Recipe:
    """The recipe ``flags`` describe (keys of ``DEFAULTS``; missing ones take their default).

    Raises:
        ValueError: a value out of range or flags that do not go together, naming the flag and the fix.
    """
    from compress import pruning

    f = {**DEFAULTS, **flags}
    block_sparsity, allocation = tuple(f["block_sparsity"] or ()), f["allocation"]
    if allocation not in ("uniform", "owl", "file"):
        block_sparsity, allocation = read_allocation(Path(allocation)), "file"
    sparsity = f["sparsity"]
    if allocation == "file" and sparsity is None:
        sparsity = sum(block_sparsity) / len(block_sparsity)
    prune = None
    if f["method"] is not None or sparsity is not None or f["pattern"] is not None:
        method = f["method"] or "wanda"
        pruning.get(method)
        prune = PruneConfig(method=method, pattern=Pattern.parse(sparsity, f["pattern"]), scope=f["scope"],
                            blocksize=f["blocksize"], dampening=f["dampening"], allocation=allocation,
                            owl_m=f["owl_m"], owl_lambda=f["owl_lambda"],
                            block_sparsity=block_sparsity if allocation != "uniform" else (), refine=f["refine"],
                            refine_cycles=f["refine_cycles"], refine_var_power=f["refine_var_power"])
    elif allocation != "uniform" or f["refine"] is not None:
        raise ValueError("--allocation/--refine shape pruning: add --method and --sparsity (e.g. --sparsity 0.6)")
    quant = None
    if f["quant"] is not None:
        quant = QuantConfig.parse(f["quant"], symmetric=f["quant_sym"], method=f["quant_method"],
                                  actorder=f["quant_actorder"], dampening=f["dampening"], blocksize=f["blocksize"],
                                  scale=f["quant_scale"], hessian_shrink=f["quant_hessian_shrink"])
    act = None
    per_layer = read_per_layer(Path(f["act_sparsity_file"])) if f["act_sparsity_file"] else dict(f["act_per_layer"])
    if f["act_sparsity"] is not None or per_layer:
        act = ActConfig(sparsity=f["act_sparsity"] if f["act_sparsity"] is not None else 0.5, method=f["act_method"],
                        targets=tuple(f["act_targets"] or ()), per_layer=per_layer, prefill=f["act_prefill"],
                        positions=f["act_positions"], scale=f["act_scale"])
    calib = CalibConfig(source=f["calib"], nsamples=f["nsamples"], seqlen=f["seqlen"], seed=f["seed"],
                        temperature=f["self_temperature"], top_p=f["self_top_p"])
    return Recipe(prune=prune, quant=quant, ignore=tuple(f["ignore"] or ()), calib=calib, act=act,
                  quant_lm_head=f["quant_lm_head"], gram_precision=f["gram_precision"],
                  forward_precision=f["forward_precision"])


def to_flags(recipe: Recipe) -> dict:
    """The flags that give ``recipe`` (``from_flags(to_flags(r)) == r``)."""
    p, q, a, c = recipe.prune, recipe.quant, recipe.act, recipe.calib
    flags = {"ignore": tuple(recipe.ignore), "quant_lm_head": recipe.quant_lm_head,
             "gram_precision": recipe.gram_precision, "forward_precision": recipe.forward_precision,
             "calib": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed,
             "self_temperature": c.temperature, "self_top_p": c.top_p}
    if p is not None:
        pattern = p.pattern
        shape = f"{pattern.n}:{pattern.m}" if pattern.is_nm else f"g{pattern.group}" if pattern.group else None
        flags.update(method=p.method, sparsity=None if pattern.is_nm else pattern.sparsity, pattern=shape,
                     scope=p.scope, blocksize=p.blocksize, dampening=p.dampening, allocation=p.allocation,
                     block_sparsity=p.block_sparsity, owl_m=p.owl_m, owl_lambda=p.owl_lambda, refine=p.refine,
                     refine_cycles=p.refine_cycles, refine_var_power=p.refine_var_power)
    if q is not None:
        flags.update(quant=f"w{q.bits}g{q.group_size}" if q.group_size else f"w{q.bits}", quant_sym=q.symmetric,
                     quant_method=q.method, quant_actorder=q.actorder, quant_scale=q.scale,
                     quant_hessian_shrink=q.hessian_shrink)
        if p is None:
            flags.update(blocksize=q.blocksize, dampening=q.dampening)
    if a is not None:
        flags.update(act_sparsity=a.sparsity, act_method=a.method, act_targets=a.targets,
                     act_per_layer=dict(a.per_layer), act_prefill=a.prefill, act_positions=a.positions,
                     act_scale=a.scale)
    return flags


def merge(base: dict, given: dict) -> dict:
    """``base`` flags (a recipe file's) with the flags ``given`` on the command line on top. A pattern given
    alone replaces the file's sparsity when it is N:M, and a sparsity given alone replaces the file's N:M."""
    merged = {**base, **given}
    if "pattern" in given and "sparsity" not in given and given["pattern"] and ":" in given["pattern"]:
        merged["sparsity"] = None
    if "sparsity" in given and "pattern" not in given and base.get("pattern") and ":" in base["pattern"]:
        merged["pattern"] = None
    if "act_sparsity_file" in given:
        merged["act_per_layer"] = {}
    if "allocation" in given:
        merged["block_sparsity"] = ()
    return merged


def read(path: Path) -> tuple[Recipe, str | None]:
    """A recipe file (YAML or JSON: ``Recipe.to_dict``'s form, or a compression.json) and the output format
    it names, if any.

    Raises:
        ValueError: unreadable, or a key or value the recipe does not take, named with the fix.
    """
    import yaml

    where = f"--recipe {str(path)!r}"
    try:
        text = Path(path).read_text()
        data = yaml.safe_load(text) if Path(path).suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{where} is not a readable YAML or JSON file ({' '.join(str(err).split())}): "
                         f"write the fields of a compression.json's recipe") from err
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds no mapping: write e.g. 'prune: {{method: wanda, pattern: {{sparsity: 0.5}}}}'")
    fmt = data.get("format")
    if "recipe" in data:  # a whole compression.json
        data = data["recipe"]
    else:
        data = {k: v for k, v in data.items() if k != "format"}
    try:
        return Recipe.from_dict(data), fmt
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where}: {err}: see the recipe of a compression.json for the fields") from err


def read_allocation(path: Path) -> tuple[float, ...]:
    """``--allocation FILE``: a JSON list of per-block sparsities, or an object with ``block_sparsity`` (as
    compression.json's recipe records it: an OWL run's allocation can be reused)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--allocation {str(path)!r} is neither uniform, owl nor a readable JSON file ({err}): "
                         f"write a list with one sparsity per block, e.g. [0.55, 0.6, 0.65]") from err
    if isinstance(data, dict) and "recipe" in data:
        data = Recipe.from_dict(data["recipe"]).prune.block_sparsity if data["recipe"].get("prune") else None
    elif isinstance(data, dict):
        data = data.get("block_sparsity")
    if not isinstance(data, (list, tuple)) or not data or not all(isinstance(v, (int, float)) for v in data):
        raise ValueError(f"--allocation {str(path)!r} must hold a list with one sparsity per decoder block, "
                         f"e.g. [0.55, 0.6, 0.65]")
    return tuple(float(v) for v in data)


def read_per_layer(path: Path) -> dict:
    """``--act-sparsity-file FILE``: a JSON object mapping linear names to target activation sparsities."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--act-sparsity-file {str(path)!r} is not readable JSON ({err}): write {{\"name\": 0.5, ...}}") from err
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ValueError(f"--act-sparsity-file {str(path)!r} must map linear names to fractions, e.g. "
                         f"{{\"model.layers.0.mlp.down_proj\": 0.4}}")
    return {str(k): float(v) for k, v in data.items()}
