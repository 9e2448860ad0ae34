"""Zero-shot (and few-shot) accuracy through lm-eval, on the model as compress loads it.

The in-memory model (activation thresholds installed, later packed kernels swapped in) is wrapped in
lm-eval's ``HFLM``, so what is evaluated is what compress runs, not a fresh load of the folder's weights.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)


class TaskError(ValueError):
    """A task cannot be found or its data cannot be read."""


@dataclass
class ZeroShotResult:
    """Per task, every metric lm-eval reports with its stderr; and how it was run."""

    tasks: dict[str, dict[str, float]]
    protocol: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_accuracy(self) -> float | None:
        """Mean of each task's ``acc`` (the usual headline number), ``None`` if no task reports it."""
        accs = [m["acc"] for m in self.tasks.values() if "acc" in m]
        return sum(accs) / len(accs) if accs else None

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_accuracy": self.mean_accuracy}


def set_offline() -> None:
    """Make the HF libraries fail fast instead of trying the network (``--offline``)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"


def zero_shot(model, tokenizer, tasks: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
              batch_size: int = 1, seed: int = 0, include_path: str | None = None) -> ZeroShotResult:
    """Run lm-eval's ``simple_evaluate`` on ``tasks`` with ``model`` (a transformers causal LM, in memory).

    Raises:
        TaskError: a task name lm-eval does not know, or a dataset it cannot load (offline).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = f" in {include_path!r}" if include_path else "; local task YAMLs go in a folder passed with --include-path"
        raise TaskError(f"lm-eval has no task {unknown[0]!r}{hint}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    try:
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, log_samples=False, bootstrap_iters=1000)
    except (ConnectionError, OSError) as err:  # datasets offline / missing files
        raise TaskError(f"cannot load the data of {tasks}: {str(err).splitlines()[0]}; offline, give a local copy: "
                        f"a task YAML with dataset_path: json and data_files, in a folder passed with --include-path") from err
    metrics = {}
    for task, values in out["results"].items():
        metrics[task] = {key.split(",")[0]: float(v)
                         for key, v in values.items() if isinstance(v, (int, float)) and "," in key}
    protocol = {"harness": "lm-eval", "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                "seed": seed, "include_path": include_path,
                "n_samples": {t: v.get("effective", v.get("original")) for t, v in out.get("n-samples", {}).items()}}
    return ZeroShotResult(tasks=metrics, protocol=protocol, seconds=time.perf_counter() - start)
