"""Images for vision transformers: labelled ImageNet-layout folders, preprocessing, calibration inputs.

Folder layouts understood by :func:`load_image_folder` (images are ``.jpeg/.jpg/.png/.bmp/.webp`` files,
found recursively, hidden paths skipped, sorted by relative path):

* synset-named files, e.g. ``n01440764_tench.JPEG`` or ``n01440764_10026.JPEG`` (the shared
  ``imagenet-sample-images``): the class is the file name's synset;
* class sub-folders, e.g. ``val/n01440764/ILSVRC2012_val_00000293.JPEG`` or ``cats/x.png``: the class is
  the image's folder name;
* plain files at the top level: no label (``None``).

Class indices: when every class is a synset and an ``imagenet_class_index.json`` (Keras-style
``{"0": ["n01440764", "tench"], ...}``) lies in the folder or its parent, its indices are used; otherwise
a class's index is its position in the sorted list of the classes present (ImageNet's own indices only
when all 1,000 synsets are present).

Preprocessing (:func:`preprocess`): RGB (grayscale and palette images are converted), resize the shorter
side to ``size / crop_pct`` (bicubic), center crop ``size x size``, scale to [0, 1], normalise with
``mean``/``std``; or the model's own transformers image processor when one is given.
:func:`model_preprocessing` reads ``mean``/``std``/``crop_pct`` from a timm model's ``pretrained_cfg``
(ImageNet defaults otherwise; timm's ``interpolation`` and ``crop_mode`` are not followed: always
bicubic, center crop).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})
CLASS_INDEX_FILE = "imagenet_class_index.json"
DEFAULT_CROP_PCT = 0.875  # resize 256 -> crop 224, the usual ImageNet evaluation transform
TWO_CROP_FRACTION = 0.75
_SYNSET = re.compile(r"n\d{8}")

ImageLike = str | Path | Image.Image


# ----------------------------------------------------------------------------- labelled folders


def _class_key(path: Path, root: Path) -> str | None:
    """The class of one image: the synset its name starts with, else its folder name, else None."""
    head = re.split(r"[_.\-]", path.name, maxsplit=1)[0]
    if _SYNSET.fullmatch(head):
        return head
    return path.parent.name if path.parent != root else None


def _read_class_index(root: Path) -> dict[str, int] | None:
    """``{synset: index}`` from an ``imagenet_class_index.json`` in ``root`` or its parent, if any."""
    for folder in (root, root.parent):
        path = folder / CLASS_INDEX_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return {str(entry[0]): int(idx) for idx, entry in data.items()}
            except (ValueError, TypeError, IndexError, AttributeError) as exc:
                raise DataError(f"{path}: expected {{\"index\": [synset, name], ...}}") from exc
    return None


def _class_indices(root: Path, keys: set[str]) -> dict[str, int]:
    """Map every class key to an integer label (see the module docstring)."""
    if keys and all(_SYNSET.fullmatch(k) for k in keys):
        table = _read_class_index(root)
        if table is not None:
            missing = sorted(keys - table.keys())
            if missing:
                raise DataError(
                    f"synsets {', '.join(missing[:5])} are not in the {CLASS_INDEX_FILE} beside {root}")
            return {k: table[k] for k in keys}
    return {k: i for i, k in enumerate(sorted(keys))}


def load_image_folder(path: str | Path, limit: int | None = None) -> list[tuple[Path, int | None]]:
    """``[(image path, class index or None), ...]`` for an ImageNet-layout folder, sorted by path.

    ``limit`` keeps the first ``limit`` images (class indices are computed over the whole folder first).
    Raises :class:`DataError` for a missing folder, a folder without images or a bad class index file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    keys = [_class_key(p, root) for p in files]
    index = _class_indices(root, {k for k in keys if k is not None})
    items = [(p, index[k] if k is not None else None) for p, k in zip(files, keys, strict=True)]
    return items[:limit] if limit is not None else items


# ----------------------------------------------------------------------------- pixels


def open_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path or an image (grayscale / palette / RGBA converted to RGB)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {image}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {image}: {exc}") from exc


def to_tensor(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """RGB PIL image ``H x W`` -> normalised float32 ``[3, H, W]``."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize_center_crop(image: Image.Image, size: int, crop_pct: float = DEFAULT_CROP_PCT) -> Image.Image:
    """Resize the shorter side to ``round(size / crop_pct)`` (bicubic), then center-crop ``size x size``."""
    if not 0 < crop_pct <= 1:
        raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
    w, h = image.size
    short = round(size / crop_pct)
    if w <= h:
        new_w, new_h = short, max(short, round(h * short / w))
    else:
        new_w, new_h = max(short, round(w * short / h)), short
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(
    images: Sequence[ImageLike],
    processor=None,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = DEFAULT_CROP_PCT,
    progress: bool = False,
) -> torch.Tensor:
    """Paths or PIL images -> ``pixel_values [N, 3, size, size]`` float32.

    With a transformers image ``processor`` its own resize/crop/normalisation is used (``size``, ``mean``,
    ``std`` and ``crop_pct`` are then ignored) and the output size is the processor's.
    """
    if len(images) == 0:
        raise DataError("no images to preprocess")
    rgb = (open_rgb(im) for im in images)
    if processor is not None:
        return processor(images=list(rgb), return_tensors="pt")["pixel_values"].float()
    out = torch.empty(len(images), 3, size, size)
    for i, im in enumerate(tqdm(rgb, total=len(images), desc="images", disable=not progress)):
        out[i] = to_tensor(resize_center_crop(im, size, crop_pct), mean, std)
    return out


def model_preprocessing(model: object, processor: object = None) -> dict[str, Any]:
    """``{"mean", "std", "crop_pct"}`` for :func:`preprocess`: a timm model's ``pretrained_cfg`` values
    (``model.pretrained_cfg``, a dict); else a transformers image processor's ``image_mean`` /
    ``image_std`` / ``crop_pct`` (the model folder's ``preprocessor_config.json``, e.g. Swin's or ViT's),
    where it normalises; else the ImageNet defaults. Resizing and cropping stay :func:`preprocess`'s."""
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = dict(cfg) if isinstance(cfg, dict) else {}
    if not cfg and processor is not None and getattr(processor, "do_normalize", True) is not False:
        cfg = {"mean": getattr(processor, "image_mean", None), "std": getattr(processor, "image_std", None),
               "crop_pct": getattr(processor, "crop_pct", None)}
    def rgb(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
        value = default if value is None else value
        value = (value,) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(value) != 3:
            raise DataError(f"normalisation needs one mean/std per RGB channel, got {value}")
        return value

    return {"mean": rgb(cfg.get("mean"), IMAGENET_MEAN), "std": rgb(cfg.get("std"), IMAGENET_STD),
            "crop_pct": float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)}


def calibration_images(
    path: str | Path,
    nsamples: int,
    seed: int = 0,
    processor=None,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = DEFAULT_CROP_PCT,
    input_name: str = "pixel_values",
) -> list[dict[str, torch.Tensor]]:
    """``nsamples`` images drawn at random (``seed``) from a folder, as engine inputs:
    ``[{input_name: [1, 3, S, S]}, ...]`` (``input_name``: ``pixel_values`` for transformers models,
    ``x`` for timm's)."""
    items = load_image_folder(path)
    if not 0 < nsamples <= len(items):
        raise DataError(f"asked for {nsamples} calibration images; {path} holds {len(items)}")
    chosen = random.Random(seed).sample(items, nsamples)
    pixels = preprocess([p for p, _ in chosen], processor, size, mean, std, crop_pct)
    return [{input_name: pixels[i : i + 1]} for i in range(nsamples)]


def two_crop_pairs(
    images: Sequence[ImageLike],
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fraction: float = TWO_CROP_FRACTION,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping crops per image for retrieval (``shared/data/SOURCES.md`` section 5).

    For a ``W x H`` image: the top-left ``fraction`` (``[0, fW) x [0, fH)``) and the bottom-right
    ``fraction`` (``[W - fW, W) x [H - fH, H)``), each resized to ``size x size`` (aspect not kept) with
    ``resample`` and normalised. Returns ``(first, second)``, each ``[N, 3, size, size]``.

    DINOv2-small FP retrieval top-1 on the 1,000 shared images (SOURCES.md states 53.6 %): 52.5 % with
    PIL bicubic (the default), 53.0 % with PIL bilinear, 52.4 % with ``F.interpolate`` bilinear; keeping
    the aspect ratio (shorter side 224 + center crop) gives 39.9 %, so the crops are resized directly.
    """
    if len(images) == 0:
        raise DataError("no images to crop")
    if not 0 < fraction <= 1:
        raise DataError(f"crop fraction must be in (0, 1], got {fraction}")
    first = torch.empty(len(images), 3, size, size)
    second = torch.empty_like(first)
    for i, im in enumerate(tqdm(images, desc="crops", disable=not progress)):
        rgb = open_rgb(im)
        w, h = rgb.size
        cw, ch = round(w * fraction), round(h * fraction)
        first[i] = to_tensor(rgb.crop((0, 0, cw, ch)).resize((size, size), resample), mean, std)
        second[i] = to_tensor(rgb.crop((w - cw, h - ch, w, h)).resize((size, size), resample), mean, std)
    return first, second
