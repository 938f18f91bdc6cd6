"""Multimodal evaluation: image-conditioned caption perplexity and the agreement of the image features.

* :func:`caption_ppl`: on held-out image-text pairs (:class:`lrquant.data.multimodal.PairSample`), the
  perplexity of the caption's tokens given the image and the prompt, ``exp(mean NLL)`` over every caption
  token of every pair (the end-of-turn tokens of the assistant turn included, as the chat renders them).
* :func:`image_features`: what the language model receives for the images, the projector's output
  ``[N, T, H]`` (``T`` image tokens per sample, in the language model's width), so a quantized tower *and*
  projector are both seen; :func:`feature_agreement` is the mean cosine between FP and quantized features
  per image token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.multimodal import PairSample
from ..engine import to_device
from ..errors import LrquantError
from .perplexity import output_logits


@torch.no_grad()
def caption_ppl(model: nn.Module, samples: list[PairSample], device: str | torch.device = "cpu") -> float:
    """Caption perplexity given the image (see the module docstring); the model must be on ``device``."""
    total, count = 0.0, 0
    for s in samples:
        ids = s.inputs["input_ids"]
        logits = output_logits(model(**to_device(s.inputs, torch.device(device)))).float().cpu()
        # token t is predicted at position t - 1
        pred = logits[0, s.start - 1 : s.end - 1]
        target = ids[0, s.start : s.end]
        total += float(F.cross_entropy(pred, target, reduction="sum"))
        count += int(target.numel())
    if count == 0:
        raise LrquantError("no caption tokens to score")
    return math.exp(total / count)


class _Stop(Exception):
    """Raised by the projector hook to end the forward once the image features are taken."""


@torch.no_grad()
def image_features(model: nn.Module, projector: str, samples: list[PairSample],
                   device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The output of the module at ``projector`` (the image tokens the language model receives), one
    ``[T, H]`` (or ``[1, T, H]``) float tensor per sample, on CPU."""
    feats: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "pooler_output", output)
        feats.append(out.detach().float().cpu())
        raise _Stop

    handle = model.get_submodule(projector).register_forward_hook(hook)
    try:
        for s in samples:
            try:
                model(**to_device(s.inputs, torch.device(device)))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(feats) != len(samples):
        raise LrquantError(f"{projector} did not run on every sample (image inputs missing?)")
    return feats


def feature_agreement(fp: list[torch.Tensor], quant: list[torch.Tensor]) -> float:
    """Mean cosine similarity between FP and quantized image features, per image token."""
    cos = [F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
           for a, b in zip(fp, quant, strict=True)]
    return float(torch.cat(cos).mean())
