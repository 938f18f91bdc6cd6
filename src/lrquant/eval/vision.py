"""Vision evaluation: classifier top-1, two-crop retrieval top-1 and FP-vs-quantized feature cosine.

Every function runs the model in batches of ``pixel_values [B, 3, S, S]`` under ``torch.no_grad`` on
``device`` (the model must already be there) and shows a tqdm bar over batches when ``progress``.

Models: transformers vision models (``model(pixel_values=...)`` returning ``.logits`` /
``.pooler_output``) and timm models (``model(x)`` returning logits; features are timm's pre-logits,
``forward_head(forward_features(x), pre_logits=True)``: the pooled, normed token before the classifier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, LrquantError


def _batches(pixels: torch.Tensor, batch_size: int, desc: str, progress: bool):
    if batch_size < 1:
        raise LrquantError(f"batch_size must be positive, got {batch_size}")
    starts = range(0, pixels.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2):
        yield pixels[i : i + batch_size]


def input_name(model: nn.Module) -> str:
    """The keyword the model takes its images by: ``pixel_values`` (transformers), else the first
    parameter of its forward (timm: ``x``)."""
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return "pixel_values" if "pixel_values" in params or not params else params[0]


def logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Classifier logits ``[B, C]`` of ``pixels [B, 3, S, S]`` (``.logits`` or a plain tensor output)."""
    out = model(**{input_name(model): pixels})
    return out if isinstance(out, torch.Tensor) else out.logits


def features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Image embeddings ``[B, H]``: ``pooler_output``, or timm's pre-logits features."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):  # timm
        return model.forward_head(model.forward_features(pixels), pre_logits=True)
    output = model(**{input_name(model): pixels})
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise LrquantError(f"{type(output).__name__} has no pooler_output; use a backbone (e.g. Dinov2Model)")
    return pooled


@torch.no_grad()
def embed(
    model: nn.Module, pixels: torch.Tensor, batch_size: int = 32, device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """:func:`features` of ``pixels [N, 3, S, S]`` -> ``[N, H]`` float32 on CPU."""
    outs = [features(model, x.to(device)).float().cpu() for x in _batches(pixels, batch_size, "embed", progress)]
    return torch.cat(outs)


@torch.no_grad()
def top1(
    model: nn.Module, images: torch.Tensor, labels: Sequence[int | None] | torch.Tensor, batch_size: int = 32,
    device: str | torch.device = "cpu", progress: bool = True,
) -> float:
    """Top-1 accuracy in [0, 1] of a classifier (:func:`logits` ``[B, C]``) on ``images [N, 3, S, S]``
    with integer ``labels [N]``."""
    if any(label is None for label in labels):
        raise DataError("top1 needs a label for every image (the folder has unlabelled images)")
    labels = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels), dtype=torch.long)
    if labels.shape[0] != images.shape[0] or images.shape[0] == 0:
        raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    preds = [logits(model, x.to(device)).argmax(-1).cpu() for x in _batches(images, batch_size, "top1", progress)]
    return float((torch.cat(preds) == labels).float().mean())


def retrieval_top1_from_embeddings(first: torch.Tensor, second: torch.Tensor) -> float:
    """``first, second: [N, H]`` -> fraction of rows ``i`` whose most cosine-similar row of ``second``
    is row ``i``."""
    if first.shape != second.shape or first.shape[0] == 0:
        raise DataError(f"retrieval needs two equal, non-empty embedding sets, got {tuple(first.shape)} and "
                        f"{tuple(second.shape)}")
    sim = F.normalize(first.float(), dim=-1) @ F.normalize(second.float(), dim=-1).T
    return float((sim.argmax(dim=-1) == torch.arange(first.shape[0])).float().mean())


def retrieval_top1(
    model: nn.Module, pairs: tuple[torch.Tensor, torch.Tensor], batch_size: int = 32,
    device: str | torch.device = "cpu", progress: bool = True,
) -> float:
    """Two-crop retrieval top-1 in [0, 1]: each first crop's :func:`features` retrieve, by cosine, its
    partner among all second crops. ``pairs = (first, second)``, each ``[N, 3, S, S]``
    (see :func:`lrquant.data.images.two_crop_pairs`)."""
    first, second = pairs
    return retrieval_top1_from_embeddings(embed(model, first, batch_size, device, progress),
                                          embed(model, second, batch_size, device, progress))


def feature_cosine(
    fp_model: nn.Module, q_model: nn.Module, batch: torch.Tensor, batch_size: int = 32,
    device: str | torch.device = "cpu", progress: bool = True,
) -> float:
    """Mean over images of the cosine between the two models' :func:`features` on ``batch [N, 3, S, S]``."""
    a = embed(fp_model, batch, batch_size, device, progress)
    b = embed(q_model, batch, batch_size, device, progress)
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def fp_outputs_cached(model_id: str, model: nn.Module, inputs: Sequence[torch.Tensor],
                      outputs: Callable[[nn.Module], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``outputs(model)`` of the FP model, cached in the user cache per (model content ``model_id``, its
    weights as they are in memory, the exact input pixels ``inputs``): every method x scheme run on the same
    images then pays for the FP pass once."""
    import hashlib

    from safetensors.torch import load_file

    from ..identity import tensor_digest
    from ..io import atomic_save_tensors
    from ..models import cache_dir

    key = f"{model_id}:{tensor_digest(dict(model.state_dict()))}:{tensor_digest(list(inputs))}"
    path = cache_dir() / "fp_vision" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".safetensors")
    if path.is_file():
        return load_file(str(path))
    out = outputs(model)
    atomic_save_tensors(path, out)
    return out
