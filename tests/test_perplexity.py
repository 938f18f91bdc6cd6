"""Perplexity (GPTQ protocol) against hand-computed references on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from torch import nn

from lrquant.errors import ConfigError, DataError
from lrquant.eval.perplexity import PerplexityResult, perplexity, window_loss

VOCAB = 96


class UniformLM(nn.Module):
    """All-zero logits: every next token has probability 1/vocab. Records how it was called."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append({"grad": torch.is_grad_enabled(), "training": self.training, **kwargs})
        return torch.zeros(*input_ids.shape, self.vocab)


def reference_ppl(model: nn.Module, tokens: torch.Tensor, seqlen: int, windows: int) -> float:
    """Plain loop: mean CE of shifted logits per window, exp of the mean (GPTQ's nll * seqlen form)."""
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            batch = tokens[:, i * seqlen : (i + 1) * seqlen]
            logits = model(batch, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[0, :-1], batch[0, 1:])
            nlls.append(loss * seqlen)
    return math.exp(torch.stack(nlls).sum().item() / (windows * seqlen))


@pytest.fixture(scope="module")
def model_and_tokens():
    model = tiny_llama(hidden=32, vocab=VOCAB, max_position_embeddings=64)
    tokens = torch.randint(0, VOCAB, (1, 5 * 32 + 7), generator=torch.Generator().manual_seed(1))
    return model, tokens


def test_matches_hand_loop(model_and_tokens):
    model, tokens = model_and_tokens
    result = perplexity(model, tokens, seqlen=32, progress=False)
    assert isinstance(result, PerplexityResult)
    assert (result.windows, result.total_windows, result.tokens) == (5, 5, 160)  # tail of 7 dropped
    expected = reference_ppl(model, tokens, 32, 5)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)
    assert 40 < result.ppl < 400  # a random model is near-uniform over 96 tokens
    assert result.seconds >= 0


def test_max_windows_takes_the_first(model_and_tokens):
    model, tokens = model_and_tokens
    result = perplexity(model, tokens, seqlen=32, max_windows=2, progress=False)
    assert (result.windows, result.total_windows, result.tokens) == (2, 5, 64)
    assert result.ppl == pytest.approx(reference_ppl(model, tokens, 32, 2), rel=1e-5)
    assert perplexity(model, tokens, seqlen=32, max_windows=99, progress=False).windows == 5
    one_d = perplexity(model, tokens[0], seqlen=32, max_windows=2, progress=False)
    assert one_d.ppl == result.ppl


def test_chunked_loss_equals_full_cross_entropy():
    logits = torch.randn(1, 37, VOCAB, generator=torch.Generator().manual_seed(2)).half()
    ids = torch.randint(0, VOCAB, (1, 37), generator=torch.Generator().manual_seed(3))
    full = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
    assert window_loss(logits, ids, chunk_rows=5) == pytest.approx(full, rel=1e-6)
    assert window_loss(logits, ids) == pytest.approx(full, rel=1e-6)


def test_uniform_logits_give_vocab_size():
    model = UniformLM(vocab=50).train()
    tokens = torch.randint(0, 50, (1, 100))
    result = perplexity(model, tokens, seqlen=16, progress=False)
    assert result.ppl == pytest.approx(50.0, rel=1e-6)
    assert result.nll == pytest.approx(math.log(50.0), rel=1e-6)
    assert (result.windows, result.total_windows) == (6, 6)
    assert len(model.calls) == 6
    assert all(c == {"grad": False, "training": False, "use_cache": False} for c in model.calls)
    assert model.training  # mode restored


def test_too_few_tokens_and_bad_arguments():
    model = UniformLM(vocab=8)
    with pytest.raises(DataError, match="has 31 tokens, fewer than one window of seqlen=32"):
        perplexity(model, torch.zeros(1, 31, dtype=torch.long), seqlen=32, progress=False)
    with pytest.raises(ConfigError):
        perplexity(model, torch.zeros(1, 64, dtype=torch.long), seqlen=32, max_windows=0, progress=False)
    with pytest.raises(DataError, match="must be \\[1, T\\]"):
        perplexity(model, torch.zeros(2, 64, dtype=torch.long), seqlen=32, progress=False)
