"""Shared fixtures: real data paths when present, a tiny model folder with the SmolLM2 tokenizer, one CPU
thread for tiny models. Shared builders (tiny models, random transforms) are in ``helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one thread is faster than several fighting over a shared CPU (module-wide, with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 blocks, hidden 64) with the SmolLM2 tokenizer, saved as a local transformers
    folder named ``model`` (like every run's ``model/``)."""
    from helpers import tiny_llama
    from transformers import AutoTokenizer

    from lrquant.models import resolve_model_path

    path, _ = resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(path)
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(vocab=len(tok), max_position_embeddings=512).save_pretrained(out)
    tok.save_pretrained(out)
    return out
