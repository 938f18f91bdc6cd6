"""Rotation pre-step (``--rotate hadamard``), the model surgery: exactness of norm fusion + residual
rotation + online Hadamards on tiny random models in float64 (GQA, biases, QK-norm, tied/untied,
non-power-of-two widths), refusals, negative controls, and the point of it: an outlier channel in the
residual stream is spread out. The Hadamard maths itself: tests/test_hadamard.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from helpers import CASES, randomize, tiny_llama
from torch import nn

from lrquant.arch import get_mapping
from lrquant.errors import UnsupportedArchitectureError
from lrquant.quant.hadamard import OnlineHadamard
from lrquant.quant.quantizers import QuantLinear
from lrquant.transforms import ScaleShift, fold_block
from lrquant.transforms.rotation import (
    OnlineRotatedLinear,
    _rotate_fused,
    attach_online,
    fuse_norms,
    online_specs,
    pairs_without_online_inputs,
    rotate_model,
)
from lrquant.transforms.scale_shift import pair_channels

VOCAB = 128
IDS = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(tied: bool = False, hidden: int = 64, inter: int = 128, heads: int = 4, kv: int = 2, bias: bool = False):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tied,
        attention_bias=bias, mlp_bias=bias))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False))


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama_gqa_untied": lambda: _llama(tied=False),
    "llama_tied": lambda: _llama(tied=True),
    "qwen2_bias": _qwen2,
    "llama_all_biases": lambda: _llama(bias=True),  # o_proj / down_proj biases: b <- Q^T b
    "qwen3_qknorm_tied": _qwen3,
    # SmolLM2's shape in miniature: hidden 72 = 9 heads x 8 (9 x 8: Paley 36 x 2), 3 kv heads,
    # intermediate 96 = 12 x 8 (Paley 12 x Sylvester 8), 9 heads -> random-orthogonal fallback, tied
    "smollm2_shaped": lambda: _llama(tied=True, hidden=72, inter=96, heads=9, kv=3),
}
TIED = {"llama_tied", "qwen3_qknorm_tied", "smollm2_shaped"}


def _model(name: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return randomize(MODELS[name](), seed=seed).double()


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ---- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("online_value", [False, True], ids=["resid+down", "resid+down+value"])
@pytest.mark.parametrize("name", list(MODELS))
def test_rotate_model_is_exact(name, online_value):
    model = _model(name)
    mapping = get_mapping(model)
    was_tied = model.lm_head.weight is model.get_submodule(mapping.embed_tokens).weight
    ref = _logits(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    online = rotate_model(model, mapping, seed=11, online_value=online_value)
    out = _logits(model)
    assert (ref - ref.mean()).abs().max() > 1e-2  # logits are not constant: the check can fail
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert (model.model.layers[0].self_attn.q_proj.weight - q_before).abs().max() > 1e-2  # it did rotate

    expected = [f"model.layers.{i}.mlp.down_proj.input_transform" for i in range(2)]
    if online_value:
        expected = [p for i in range(2) for p in (f"model.layers.{i}.mlp.down_proj.input_transform",
                                                  f"model.layers.{i}.self_attn.o_proj.input_transform")]
    assert online == expected
    assert sorted(online_specs(model)) == sorted(expected)
    assert online_specs(model)[expected[0]]["size"] == model.config.intermediate_size
    for layer in model.model.layers:
        assert isinstance(layer.mlp.down_proj, OnlineRotatedLinear)
        torch.testing.assert_close(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not model.config.tie_word_embeddings
    model.tie_weights()  # transformers must not tie the (now different) head and embeddings again
    assert model.lm_head.weight is not model.get_submodule(mapping.embed_tokens).weight
    torch.testing.assert_close(_logits(model), ref, atol=1e-6, rtol=1e-6)
    assert was_tied == (name in TIED)  # both the tied and the untied path ran


def test_quantlinear_keeps_the_online_rotation():
    """QuantLinear (no quantizers) wrapping the rotated linears computes the same logits."""
    model = _model("smollm2_shaped")
    ref = _logits(model)
    rotate_model(model, get_mapping(model), online_value=True)
    for layer in model.model.layers:
        layer.mlp.down_proj = QuantLinear(layer.mlp.down_proj, None, None)
        layer.self_attn.o_proj = QuantLinear(layer.self_attn.o_proj, None, None)
        assert isinstance(layer.mlp.down_proj.input_transform, OnlineHadamard)
    torch.testing.assert_close(_logits(model), ref, atol=1e-6, rtol=1e-6)


def test_saved_rotated_model_reloads_with_its_online_ops(tmp_path):
    """save_pretrained keeps the rotated weights (and the untied head) but not the online ops:
    attach_online puts them back from online_specs."""
    model = _model("smollm2_shaped")
    ref = _logits(model)
    rotate_model(model, get_mapping(model), online_value=True)
    specs = online_specs(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert (_logits(loaded) - ref).abs().max() > 1e-2  # without the online ops: wrong
    attach_online(loaded, specs)
    torch.testing.assert_close(_logits(loaded), ref, atol=1e-6, rtol=1e-6)
    assert online_specs(loaded) == specs


@pytest.mark.parametrize("case", [c for c in CASES if c.family in ("llama", "qwen3", "gemma3")], ids=lambda c: c.name)
def test_fuse_norms_is_exact(case):
    torch.manual_seed(0)
    model = randomize(case.build(), seed=1).double()
    mapping = get_mapping(model)
    ref = _logits(model)
    fuse_norms(model, mapping)
    torch.testing.assert_close(_logits(model), ref, atol=1e-6, rtol=1e-6)
    identity = 0.0 if mapping.norm_kind == "rms_plus_one" else 1.0
    norm = model.get_submodule(mapping.blocks)[0].get_submodule(mapping.attn_norm)
    assert torch.all(norm.weight == identity)


# ---- refusals and negative controls --------------------------------------------------------------


@pytest.mark.parametrize(("case_name", "needle"), [("gemma3", "sandwich norms"), ("gemma3_mm", "sandwich norms"),
                                                   ("opt", "LayerNorm")])
def test_refused_families(case_name, needle):
    case = next(c for c in CASES if c.name == case_name)
    model = case.build()
    with pytest.raises(UnsupportedArchitectureError, match=needle):
        rotate_model(model, get_mapping(model))


def test_refuses_bare_model_and_second_rotation():
    model = _llama()
    with pytest.raises(UnsupportedArchitectureError, match="bare base model"):
        rotate_model(model.model, get_mapping(model.model))
    rotate_model(model, get_mapping(model))
    with pytest.raises(UnsupportedArchitectureError, match="rotate once, before quantizing"):
        rotate_model(model, get_mapping(model))


def test_rotation_without_fused_norms_is_wrong():
    """Negative control: rotating the residual while the norms still carry their gains changes logits."""
    model = _model("llama_gqa_untied")
    ref = _logits(model)
    _rotate_fused(model, get_mapping(model), seed=0, online_value=False)
    assert (_logits(model) - ref).abs().max() > 1e-2


def test_online_inputs_break_diagonal_folds_and_are_filtered():
    """After rotation, a channel scale on up -> down (online Hadamard between) no longer folds; the
    filtered pairs still fold exactly."""
    model = _model("qwen2_bias")
    mapping = get_mapping(model)
    rotate_model(model, mapping, online_value=True)
    ref = _logits(model)
    block = model.get_submodule(mapping.blocks)[0]
    kept = pairs_without_online_inputs(mapping.smooth_pairs(), block)
    assert {p.kind for p in kept} == {"norm", "qk"}
    gen = torch.Generator().manual_seed(4)
    for pair in mapping.smooth_pairs():
        scale = torch.rand(pair_channels(pair, mapping, block, model.config), generator=gen,
                           dtype=torch.float64) * 1.5 + 0.5
        t = ScaleShift(pair, mapping, model.config, scale).double()
        t.attach(block)
        fold_block(block)
        diff = (_logits(model) - ref).abs().max()
        if pair in kept:
            assert diff < 1e-6, pair
        else:
            assert diff > 1e-3, pair
            ref = _logits(model)  # continue from the changed model


# ---- the point: outliers are spread --------------------------------------------------------------


def _q_input_outlier_ratio(model: nn.Module) -> float:
    """Mean over tokens of max|x| / median|x| at block 0's q_proj input."""
    seen: list[torch.Tensor] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    _logits(model, torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(9)))
    hook.remove()
    x = seen[0].abs().reshape(-1, seen[0].shape[-1])
    return float((x.amax(-1) / x.median(-1).values).mean())


def test_rotation_spreads_an_outlier_channel():
    model = _model("llama_gqa_untied")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50.0
    ref = _logits(model)
    before = _q_input_outlier_ratio(model)
    rotate_model(model, get_mapping(model), seed=0)
    after = _q_input_outlier_ratio(model)
    torch.testing.assert_close(_logits(model), ref, atol=1e-6, rtol=1e-6)
    assert before > 20.0
    assert after < before / 5.0, (before, after)


def test_rotate_composes_with_methods_and_is_reported():
    """--rotate hadamard through the API: exact in FP, composes with a learned method, online ops listed."""
    import copy

    from lrquant import api
    from lrquant.config import CalibArgs, Recipe, RotationStep, Scheme, TrainArgs
    from lrquant.errors import ConfigError

    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    res = api.quantize(copy.deepcopy(model), Recipe(method="lrquant", scheme=Scheme.from_bits(4, 4),
                       calib=CalibArgs(nsamples=4, seqlen=16), train=TrainArgs(epochs=1),
                       pre=[RotationStep("hadamard")]), calib, progress=False)
    assert any(op.endswith("mlp.down_proj.input_transform") for op in res.online_ops)
    assert torch.isfinite(res.model(calib).logits).all()
    with pytest.raises(ConfigError, match="pre.rotation.kind must be one of hadamard"):
        Recipe.from_dict({"pre": [{"rotation": {"kind": "givens"}}]})
