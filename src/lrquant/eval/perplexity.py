"""Perplexity on non-overlapping windows, the GPTQ / OmniQuant protocol.

``tokens`` [1, T] is cut into ``T // seqlen`` windows ``tokens[:, i*seqlen:(i+1)*seqlen]`` (the tail is
dropped). Each window is scored independently (no context carried over) with the mean float32 cross-entropy
of its ``seqlen - 1`` next-token predictions, and ``ppl = exp(mean of window losses)``. This equals GPTQ's
``exp(sum(loss_i * seqlen) / (windows * seqlen))``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError

LOSS_CHUNK_ROWS = 512
"""Rows of logits cast to float32 at a time: 512 x 128k vocab is 256 MiB instead of 1 GiB per window."""


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean per-token negative log-likelihood in nats."""

    ppl: float
    nll: float
    windows: int  # windows scored
    total_windows: int  # T // seqlen available
    tokens: int  # tokens in the scored windows (windows * seqlen)
    seconds: float


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: ``.logits`` (transformers), the first item of a tuple, or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    return output[0]


def window_loss(logits: torch.Tensor, input_ids: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS) -> float:
    """Mean float32 cross-entropy of ``logits[0, :-1]`` [L-1, V] against ``input_ids[0, 1:]`` [L-1].

    ``logits`` [1, L, V] stays in the model's dtype; only ``chunk_rows`` rows at a time are cast to float32
    (no shifted copy of the full logits is made). Sums are accumulated in float64.
    """
    if logits.dim() != 3 or logits.shape[0] != 1 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [1, L, V] and input_ids [1, L], got {tuple(logits.shape)}, {tuple(input_ids.shape)}"
        )
    rows = logits.shape[1] - 1
    targets = input_ids[0, 1:].to(logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        chunk = logits[0, start:stop].float()
        total += F.cross_entropy(chunk, targets[start:stop], reduction="sum").double()
    return (total / rows).item()


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` [1, T] (or [T]) int64, GPTQ protocol (see the module docstring).

    ``max_windows`` scores only the first N windows. Each window is moved to ``device`` (the model must
    already live where it can consume it) and run as ``model(window, use_cache=False)`` under
    ``torch.no_grad()`` in eval mode; the model's train/eval mode is restored afterwards. A tqdm bar shows
    the running perplexity unless ``progress`` is False.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise DataError(f"evaluation tokens must be [1, T], got shape {tuple(tokens.shape)}")
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2 to score a next token, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be positive or None, got {max_windows}")
    total_windows = tokens.shape[1] // seqlen
    if total_windows == 0:
        raise DataError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of seqlen={seqlen}")
    windows = total_windows if max_windows is None else min(total_windows, max_windows)

    was_training = model.training
    model.eval()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(windows), desc=f"perplexity (seqlen {seqlen})", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for i in bar:
                batch = tokens[:, i * seqlen : (i + 1) * seqlen].to(device)
                logits = output_logits(model(batch, use_cache=False))
                losses.append(window_loss(logits, batch))
                del logits
                bar.set_postfix(ppl=f"{_exp(sum(losses) / len(losses)):.4g}")
    finally:
        bar.close()
        model.train(was_training)
    nll = sum(losses) / windows
    return PerplexityResult(
        ppl=_exp(nll),
        nll=nll,
        windows=windows,
        total_windows=total_windows,
        tokens=windows * seqlen,
        seconds=time.perf_counter() - started,
    )


def _summary(r: PerplexityResult) -> dict[str, Any]:
    return {"ppl": r.ppl, "windows": r.windows, "total_windows": r.total_windows, "seconds": round(r.seconds, 2)}


def load_eval_sets(tokenizer: Any, datasets: list[str], data_dir: str | None) -> dict[str, torch.Tensor]:
    """``{dataset: tokens [1, T]}``: each corpus's test split, tokenized once (bad names fail here)."""
    from ..data.text import eval_tokens

    return {name: eval_tokens(tokenizer, name, data_dir=data_dir) for name in datasets}


def evaluate_ppl(
    model: nn.Module, eval_sets: dict[str, torch.Tensor], seqlen: int, windows: int | None,
    device: str | torch.device, progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{dataset: {"ppl", "windows", "total_windows", "seconds"}}`` for ``eval_sets`` (``{name: [1, T]}``)."""
    return {name: _summary(perplexity(model, tokens, seqlen=seqlen, max_windows=windows, device=device,
                                      progress=progress))
            for name, tokens in eval_sets.items()}


def fp_ppl_cached(
    model_id: str, model: nn.Module, eval_sets: dict[str, torch.Tensor], seqlen: int, windows: int | None,
    device: str | torch.device, progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_ppl` of the full-precision model, cached in the user cache per (model content
    ``model_id``, the exact evaluation tokens, seqlen, windows): another model or other data (another
    ``--data-dir``, another tokenizer) never reads a cached number."""
    import hashlib
    import json

    from ..identity import tensor_digest
    from ..io import atomic_write_json
    from ..models import cache_dir

    out: dict[str, dict[str, Any]] = {}
    for name, tokens in eval_sets.items():
        key = json.dumps([model_id, tensor_digest(tokens), seqlen, windows])
        path = cache_dir() / "fp_ppl" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
        if path.is_file():
            out[name] = json.loads(path.read_text())
            continue
        out[name] = _summary(perplexity(model, tokens, seqlen=seqlen, max_windows=windows, device=device,
                                        progress=progress))
        atomic_write_json(path, out[name])
    return out
