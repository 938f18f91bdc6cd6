"""Image-text pairs for multimodal models: the two calibration formats and the model inputs built from them.

Formats (:func:`load_pairs`):

* a JSONL file, one ``{"image": PATH, "text": CAPTION}`` object a line (``PATH`` relative to the file's
  folder, or absolute; blank lines skipped);
* an image folder (:func:`lrquant.data.images.load_image_folder`'s layouts) whose class names become
  captions ``"a photo of a <class name>"``: the name after the synset in ``n01440764_tench.JPEG``, else
  the Keras-style ``imagenet_class_index.json`` name beside it, else the class sub-folder's name
  (underscores read as spaces). Unlabelled images are refused (a caption needs a class).

Inputs (:func:`pair_inputs`): each pair becomes one chat, the user turn holding the image and
:data:`PROMPT`, the assistant turn the caption, rendered with the model's own processor and chat template
(``processor.apply_chat_template``) and processed by the processor (image tokens expanded, pixels
normalised). Every image is first resized to ``image_size`` x ``image_size`` so that all samples have the
same number of image tokens at the same positions; the token sequences are then right-padded to the
longest one with the tokenizer's pad token (its EOS when it has none) and no attention mask is passed: the
padding comes after every real token, so under causal attention it changes no real token's output, and
every sample's block keyword arguments (causal mask, the 3-row multimodal RoPE positions of Qwen2-VL,
Gemma3's image-token mask) are identical, as the engine requires. The caption's token span of each sample is
kept for the image-conditioned caption perplexity.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .images import CLASS_INDEX_FILE, load_image_folder, open_rgb

PROMPT = "Describe the image."
CAPTION = "a photo of a {}"
_SYNSET_NAME = re.compile(r"(n\d{8})[_\-.](.+)")


@dataclass
class PairSample:
    """One processed pair: ``inputs`` (``input_ids [1, L]``, ``pixel_values`` and the family's other
    processor outputs, padded to the common ``L``) and the caption's token span ``[start, end)``."""

    inputs: dict[str, torch.Tensor]
    start: int
    end: int


def is_pair_source(source: str | Path) -> bool:
    """Whether ``source`` names image-text pairs: a ``.jsonl`` file holding ``image`` keys, or a folder."""
    path = Path(source)
    if path.is_dir():
        return True
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict) and "image" in json.loads(first)
    except ValueError:
        return False


def _class_names(root: Path) -> dict[str, str]:
    """``{synset: name}`` from an ``imagenet_class_index.json`` in ``root`` or its parent (empty if none)."""
    for folder in (root, root.parent):
        path = folder / CLASS_INDEX_FILE
        if path.is_file():
            try:
                return {str(v[0]): str(v[1]) for v in json.loads(path.read_text()).values()}
            except (ValueError, TypeError, IndexError, AttributeError) as exc:
                raise DataError(f"{path}: expected {{\"index\": [synset, name], ...}}") from exc
    return {}


def _caption(path: Path, root: Path, names: dict[str, str]) -> str | None:
    match = _SYNSET_NAME.fullmatch(path.stem)
    if match is not None:
        synset, rest = match.groups()
        name = names.get(synset) or (rest if not rest.isdigit() else None)
    else:
        name = names.get(path.stem) or (path.parent.name if path.parent != root else None)
    return None if name is None else CAPTION.format(name.replace("_", " "))


def load_pairs(source: str | Path) -> list[tuple[Path, str]]:
    """``[(image path, caption), ...]`` from a JSONL file or an image folder (see the module docstring);
    one-line :class:`DataError` for a missing source, a malformed line, a missing image or an unlabelled one."""
    path = Path(source)
    if path.is_dir():
        names = _class_names(path)
        pairs = []
        for image, _ in load_image_folder(path):
            caption = _caption(image, path, names)
            if caption is None:
                raise DataError(f"{image} has no class name to caption it (image folders need synset-named "
                                "files or class sub-folders; or give a JSONL of {image, text})")
            pairs.append((image, caption))
        return pairs
    if not path.is_file():
        raise DataError(f"image-text pairs not found: {path}")
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
            ok = isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("image", "text"))
            if not ok:
                raise DataError(f"{path}:{number}: expected {{\"image\": PATH, \"text\": CAPTION}}")
            image = Path(item["image"]).expanduser()
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise DataError(f"{path}:{number}: image not found: {image}")
            pairs.append((image, item["text"]))
    if not pairs:
        raise DataError(f"{path} holds no image-text pairs")
    return pairs


def split_pairs(pairs: list[tuple[Path, str]], n_calib: int, n_eval: int, seed: int
                ) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Disjoint calibration and held-out evaluation pairs, drawn at random (``seed``)."""
    if n_calib + n_eval > len(pairs):
        raise DataError(f"asked for {n_calib} calibration + {n_eval} evaluation pairs; the source holds "
                        f"{len(pairs)}")
    chosen = random.Random(seed).sample(pairs, n_calib + n_eval)
    return chosen[:n_calib], chosen[n_calib:]


def _chat(processor: Any, caption: str | None) -> str:
    """The chat text: user turn (image + prompt), then the assistant's caption (or the generation prompt)."""
    user = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": user}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    if getattr(processor, "chat_template", None) is None:
        raise DataError("the model's processor has no chat template; image-text calibration renders each pair "
                        "with it")
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=caption is None)


def pair_inputs(processor: Any, pairs: list[tuple[Path, str]], image_size: int) -> list[PairSample]:
    """One :class:`PairSample` per pair, all of one length (see the module docstring)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    raw: list[tuple[dict[str, torch.Tensor], int]] = []
    for image, caption in pairs:
        rgb = open_rgb(image).resize((image_size, image_size))
        full = dict(processor(images=[rgb], text=[_chat(processor, caption)], return_tensors="pt"))
        prefix = processor(images=[rgb], text=[_chat(processor, None)], return_tensors="pt")["input_ids"]
        full.pop("attention_mask", None)
        raw.append((full, prefix.shape[1]))
    length = max(inputs["input_ids"].shape[1] for inputs, _ in raw)
    out = []
    for inputs, start in raw:
        n = inputs["input_ids"].shape[1]
        padded = {}
        for key, value in inputs.items():
            if value.dim() == 2 and value.shape == (1, n) and n < length:  # token-aligned: ids, token types
                fill = pad if key == "input_ids" else 0
                value = torch.cat([value, value.new_full((1, length - n), fill)], dim=1)
            padded[key] = value
        out.append(PairSample(padded, start, n))
    return out


def default_image_size(config: Any) -> int:
    """The square side images are resized to: the vision config's ``image_size``, else 448 (Qwen2-VL's
    dynamic resolution: 32 x 32 patches of 14, 256 merged tokens)."""
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    return int(size) if isinstance(size, int) else 448
