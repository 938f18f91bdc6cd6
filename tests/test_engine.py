"""Engine mechanics on tiny random models: capture, RTN == reference, static activations, KV quant,
checkpoint/resume bit-identity, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama

from lrquant import api
from lrquant.config import CalibArgs, QuantArgs, Recipe, Scheme
from lrquant.engine import capture_block_inputs, load_block_tensors
from lrquant.errors import LrquantError
from lrquant.quant.primitives import fake_quant_rows
from lrquant.quant.quantizers import QuantLinear


def _calib(n: int = 4, length: int = 16, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def _rtn_recipe(wbits=4, abits=16, group=32, kv=None) -> Recipe:
    return Recipe(method="rtn", scheme=Scheme.from_bits(wbits, abits, group, kv_bits=kv),
                  calib=CalibArgs(nsamples=4, seqlen=16))


def test_capture_matches_hidden_states():
    model = tiny_llama()
    from lrquant.arch import get_mapping

    x = _calib()
    hidden, kwargs = capture_block_inputs(model, get_mapping(model), x, torch.device("cpu"))
    assert hidden.shape == (4, 16, 64)
    ref = model(x, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(hidden, ref)
    assert "position_embeddings" in kwargs and "past_key_values" not in kwargs


def test_rtn_weight_only_equals_reference():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    x = _calib()
    api.quantize(model, _rtn_recipe(), x, progress=False)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(fake_quant_rows(mod.weight, 4, False, "group", 32))
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
    # lm_head and embeddings stay full precision
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight)


def test_rtn_w4a4_changes_output_and_kv_quant_is_active():
    torch.manual_seed(0)
    model = tiny_llama()
    fp = copy.deepcopy(model)
    x = _calib()
    api.quantize(model, _rtn_recipe(4, 4, None), x, progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.attn_quantizer is not None
    assert model.config._attn_implementation == "lrquant"
    err_w4a4 = (model(x).logits - fp(x).logits).abs().mean()
    m2 = copy.deepcopy(fp)
    api.quantize(m2, _rtn_recipe(4, 16, None), x, progress=False)
    err_w4 = (m2(x).logits - fp(x).logits).abs().mean()
    assert err_w4a4 > err_w4 > 0


def test_static_per_tensor_activations_are_calibrated():
    model = tiny_llama()
    scheme = Scheme(QuantArgs(8, False, "channel"), QuantArgs(8, False, "tensor", None, False), None)
    recipe = Recipe(method="rtn", scheme=scheme, calib=CalibArgs(nsamples=4, seqlen=16))
    api.quantize(model, recipe, _calib(), progress=False)
    q = model.model.layers[1].mlp.down_proj.input_quantizer
    assert q.mode == "static" and q.scale.numel() == 1 and q.scale.item() > 0


def test_resume_is_bit_identical(tmp_path):
    x = _calib()
    recipe = _rtn_recipe(4, 4, None)
    full = tiny_llama(layers=3)
    api.quantize(full, recipe, x, progress=False, checkpoint_dir=tmp_path / "a")

    # interrupted run: fail in block 2 after blocks 0 and 1 were checkpointed
    from lrquant.methods.rtn import RTN

    part = tiny_llama(layers=3)
    original = RTN.quantize_block

    def boom(self, ctx):
        if ctx.index == 2:
            raise KeyboardInterrupt
        return original(self, ctx)

    RTN.quantize_block = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            api.quantize(part, recipe, x, progress=False, checkpoint_dir=tmp_path / "b")
    finally:
        RTN.quantize_block = original
    resumed = tiny_llama(layers=3)
    api.quantize(resumed, recipe, x, progress=False, checkpoint_dir=tmp_path / "b", resume=True)
    for (n1, t1), (n2, t2) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert torch.equal(full(x).logits, resumed(x).logits)
    # what is not a tensor comes back too: the restored blocks' per-layer weight errors
    from lrquant.engine import layer_errors

    assert layer_errors(resumed) == layer_errors(full) and len(layer_errors(full)) == 3 * 7
    import hashlib
    import json

    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["block_sha256"] == [hashlib.sha256((tmp_path / "b" / f"block_{i:04d}.safetensors").read_bytes())
                                     .hexdigest() for i in range(3)]


def test_resume_refuses_other_recipe(tmp_path):
    x = _calib()
    api.quantize(tiny_llama(), _rtn_recipe(), x, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(LrquantError, match="different recipe"):
        api.quantize(tiny_llama(), _rtn_recipe(3), x, progress=False, checkpoint_dir=tmp_path, resume=True)


def test_load_block_tensors_creates_and_drops_params():
    block = tiny_llama().model.layers[0]
    tensors = {n: t.clone() for n, t in block.state_dict().items()}
    tensors["self_attn.q_proj.bias"] = torch.ones(64)
    del tensors["mlp.down_proj.weight"]
    load_block_tensors(block, tensors)
    assert torch.equal(block.self_attn.q_proj.bias, torch.ones(64))
    assert block.mlp.down_proj.weight is None
