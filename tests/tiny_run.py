"""Shared fixture of the run-folder tests: a tiny random Llama with the SmolLM2 tokenizer on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 blocks, hidden 64) with the SmolLM2 tokenizer, saved as a local transformers
    folder named ``model`` (like every run's ``model/``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lrquant.models import resolve_model_path

    path, _ = resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
    out = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
