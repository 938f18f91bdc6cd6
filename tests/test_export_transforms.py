"""compressed-tensors export of the rotation pre-step's online Hadamards (``transform_config``): the reload
gives the in-memory logits, dropping the transform does not (negative control), what plain transformers
does with it, and the ops the format cannot carry stay refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

from lrquant.arch import get_mapping
from lrquant.config import QuantArgs, Scheme
from lrquant.errors import ConfigError, LrquantError
from lrquant.export.compressed import ExportError, export_compressed, load_compressed
from lrquant.methods.rtn import quantize_weights_rtn
from lrquant.quant.hadamard import hadamard_matrix
from lrquant.transforms.rotation import rotate_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
W4G32 = Scheme(QuantArgs(4, False, "group", 32))
W4A4 = Scheme.from_bits(4, 4, kv_bits=16)


def rotated_quantized(scheme: Scheme, inter: int = 128, online_value: bool = False, **config
                      ) -> tuple[nn.Module, list[str]]:
    """tiny Llama (MLP width ``inter``), Hadamard pre-step (seed 0), RTN with ``scheme``; and its online ops."""
    model = tiny_llama(intermediate_size=inter, **config)
    ops = rotate_model(model, get_mapping(model), seed=0, online_value=online_value)
    return quantize_weights_rtn(model, scheme), ops


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def without_transform_config(src, dst):
    """A copy of the export ``src`` whose config.json has no ``transform_config`` (the op dropped)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]["transform_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# (scheme, MLP width, compressed-tensors type written): 128 is Sylvester (rebuildable), 96 = Paley(12) x 8
CASES = {
    "W4A16g32-asym-inter128": (W4G32, 128, "hadamard"),
    "W4A16g32-asym-inter96": (W4G32, 96, "random-hadamard"),
    "W4A4-inter128": (W4A4, 128, "hadamard"),
    "W4A4-inter96": (W4A4, 96, "random-hadamard"),
}


@pytest.mark.parametrize("label", list(CASES))
def test_rotated_export_reloads_with_the_in_memory_logits(tmp_path, label):
    """The down_proj online Hadamard is written as a ``transform_config`` (type, targets, one stored
    ``sqrt(n) H`` per linear, entries ±1) and ``load_compressed`` gives the in-memory logits; without the
    transform (config entry deleted) the logits move a lot, so the comparison can fail."""
    scheme, inter, kind = CASES[label]
    model, ops = rotated_quantized(scheme, inter)
    ref = logits(model)
    out = export_compressed(model, scheme, tmp_path / "export", online_ops=ops)

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = qcfg["transform_config"]["config_groups"]
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert list(groups) == ["down_proj_hadamard"]
    group = groups["down_proj_hadamard"]
    assert (group["type"], group["randomize"], group["head_dim"]) == (kind, False, None)
    assert group["apply"] == [{"targets": downs, "location": "input", "inverse": False, "ignore": []}]
    sd = load_file(out / "model.safetensors")
    expected = hadamard_matrix(inter) * math.sqrt(inter)  # what both loaders divide by sqrt(n) again
    for name in downs:
        stored = sd[f"{name}.down_proj_hadamard_input.weight"]
        assert stored.shape == (inter, inter) and torch.equal(stored.abs(), torch.ones_like(stored))
        torch.testing.assert_close(stored.double(), expected, atol=1e-9, rtol=0)
    sidecar = json.loads((out / "lrquant_export.json").read_text())["online_transforms"]
    assert sidecar == [{"group": "down_proj_hadamard", "type": kind, "location": "input", "size": inter,
                        "block": 1, "construction": model.model.layers[0].mlp.down_proj.input_transform.construction,
                        "linears": 2}]

    loaded = load_compressed(out)
    assert rel_err(logits(loaded), ref) <= 1e-5, rel_err(logits(loaded), ref)
    # negative control: the same checkpoint without its transform_config
    dropped = load_compressed(without_transform_config(out, tmp_path / "dropped"))
    assert rel_err(logits(dropped), ref) > 0.05


def test_plain_from_pretrained_ignores_the_transform_config(tmp_path):
    """transformers 5.24 + compressed-tensors 0.20.1: plain ``from_pretrained`` does not apply a
    ``transform_config`` (``CompressedTensorsHfQuantizer`` calls ``apply_quantization_config`` only; the
    stored matrices are reported as unexpected keys), so it gives the logits of the dropped op. Only
    ``load_compressed`` (or vLLM) runs the online Hadamard. If this starts to pass the transform, the docs'
    "what loads where" changes."""
    from transformers import AutoModelForCausalLM

    model, ops = rotated_quantized(W4G32, 128)
    ref = logits(model)
    out = export_compressed(model, W4G32, tmp_path / "export", online_ops=ops)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("hadamard" in name for name, _ in plain.named_modules())
    y = logits(plain)
    assert rel_err(y, ref) > 0.05
    dropped = load_compressed(without_transform_config(out, tmp_path / "dropped"))
    torch.testing.assert_close(y, logits(dropped), atol=0, rtol=0)


@pytest.mark.parametrize("n", [2**k for k in range(12)])
def test_sylvester_equals_compressed_tensors_hadamard(n):
    """lrquant's plain Hadamard of a power-of-two order (Sylvester) times ``sqrt(n)`` is compressed-tensors'
    ``deterministic_hadamard_matrix(n)`` element for element (so type ``hadamard`` is written: vLLM's hadacore
    and compressed-tensors' rebuild give lrquant's matrix); a Paley order is not (type ``random-hadamard``)."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    from lrquant.export.transforms import stored_matrix
    from lrquant.quant.hadamard import OnlineHadamard

    assert torch.equal(hadamard_matrix(n) * math.sqrt(n), deterministic_hadamard_matrix(n, torch.float64))
    matrix, kind = stored_matrix(OnlineHadamard(n))
    assert kind == "hadamard" and torch.equal(matrix, deterministic_hadamard_matrix(n, torch.float64))
    if n >= 8:
        assert stored_matrix(OnlineHadamard(3 * n // 2))[1] == "random-hadamard"  # 12, 24, ...: Paley


def test_sylvester_transform_is_rebuilt_and_stored_matrices_are_used(tmp_path):
    """Type ``hadamard`` (power-of-two width): compressed-tensors rebuilds ``deterministic_hadamard_matrix /
    sqrt(n)`` from the size, equal to lrquant's Sylvester matrix, so the reload is exact without the stored
    matrices too. Type ``random-hadamard``: the stored matrix is the only source; missing, the load is
    refused, and a changed stored matrix changes the logits (it is the one used)."""
    model, ops = rotated_quantized(W4G32, 128)
    ref = logits(model)
    out = export_compressed(model, W4G32, tmp_path / "pow2", online_ops=ops)
    sd = load_file(out / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "_hadamard_input" not in k}, out / "model.safetensors",
              metadata={"format": "pt"})
    assert rel_err(logits(load_compressed(out)), ref) <= 1e-5

    model, ops = rotated_quantized(W4G32, 96)
    ref = logits(model)
    out = export_compressed(model, W4G32, tmp_path / "paley", online_ops=ops)
    sd = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.down_proj_hadamard_input.weight"
    save_file({**sd, key: sd[key][:, torch.randperm(96, generator=torch.Generator().manual_seed(0))].contiguous()},
              out / "model.safetensors", metadata={"format": "pt"})
    assert rel_err(logits(load_compressed(out)), ref) > 0.05  # one layer's stored matrix permuted
    save_file({k: v for k, v in sd.items() if k != key}, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LrquantError, match="down_proj_hadamard_input.weight \\(random-hadamard\\) is not in the"):
        load_compressed(out)


def test_value_path_and_fallback_rotation_round_trip(tmp_path):
    """``online_value``: the cross-head ``H_nh (x) I_d`` on o_proj (9 heads: no Hadamard matrix of order 9,
    the random-orthogonal fallback, entries not ±1) is a second, dense ``random-hadamard`` group; W4A4,
    SmolLM2's shape in miniature (hidden 72 = 9 x 8, MLP 96)."""
    model, ops = rotated_quantized(W4A4, 96, online_value=True, hidden=72, num_attention_heads=9,
                                   num_key_value_heads=3)
    ref = logits(model)
    out = export_compressed(model, W4A4, tmp_path / "export", dtype=None, online_ops=ops)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert {k: g["type"] for k, g in groups.items()} == {"o_proj_hadamard": "random-hadamard",
                                                          "down_proj_hadamard": "random-hadamard"}
    o = load_file(out / "model.safetensors")["model.layers.0.self_attn.o_proj.o_proj_hadamard_input.weight"]
    torch.testing.assert_close(o.double(), model.model.layers[0].self_attn.o_proj.input_transform.matrix()
                               * math.sqrt(72), atol=1e-5, rtol=0)
    loaded = load_compressed(out)
    assert rel_err(logits(loaded), ref) <= 1e-5, rel_err(logits(loaded), ref)
    assert rel_err(logits(load_compressed(without_transform_config(out, tmp_path / "d"))), ref) > 0.05


def test_half_precision_rotated_export(tmp_path):
    """``dtype=float16`` (what ``--format compressed-tensors`` writes): the ±1 matrices are stored in float16
    (exact), compressed-tensors applies them in float32; logits within the half-precision export's usual
    tolerance."""
    model, ops = rotated_quantized(W4G32, 96)
    ref = logits(model)
    out = export_compressed(model, W4G32, tmp_path / "export", dtype=torch.float16, online_ops=ops)
    stored = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.down_proj_hadamard_input.weight"]
    assert stored.dtype == torch.float16
    assert rel_err(logits(load_compressed(out)).float(), ref) <= 5e-3


# ---- what stays refused --------------------------------------------------------------------------------
def test_ops_the_format_cannot_carry_stay_refused(tmp_path):
    from lrquant.export import export_gguf
    from lrquant.transforms.kron import OnlineKron

    model, ops = rotated_quantized(W4G32, 128)
    down = model.model.layers[0].mlp.down_proj
    hadamard = down.input_transform
    down.input_transform = OnlineKron((8, 16), 1, inner=hadamard)  # a Kronecker op around the Hadamard
    with pytest.raises(ExportError, match="layers.0.mlp.down_proj \\(online input transform OnlineKron\\)"):
        export_compressed(model, W4G32, tmp_path / "x", online_ops=ops)
    down.input_transform = hadamard
    with pytest.raises(ExportError, match="layers.0.mlp.up_proj.input_transform \\(declared online\\)"):
        export_compressed(model, W4G32, tmp_path / "x", online_ops=[*ops, "model.layers.0.mlp.up_proj.input_transform"])
    with pytest.raises(ExportError, match="online input transform OnlineHadamard"):  # GGUF has no online op
        export_gguf(model, W4G32, tmp_path / "x.gguf", online_ops=ops)

    model, ops = rotated_quantized(W4A4, 128)
    model.model.layers[1].self_attn.q_proj.input_quantizer.enable_act_clip(2.0, "cpu")
    with pytest.raises(ExportError, match="q_proj \\(learned activation clip ratio"):
        export_compressed(model, W4A4, tmp_path / "x", online_ops=ops)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_format_check_accepts_rotation_for_compressed_tensors_only():
    from lrquant.config import Recipe
    from lrquant.runs import check_format

    recipe = Recipe(method="rtn", scheme=W4G32).with_rotation("hadamard")
    check_format(recipe, "compressed-tensors")
    check_format(recipe.with_rotation("learned"), "compressed-tensors")
    with pytest.raises(ConfigError, match="--format gguf cannot carry the online Hadamard rotation"):
        check_format(recipe, "gguf")


def test_run_with_rotation_exports_and_reexports(tiny_model_dir, tmp_path):
    """The CLI's path: ``quantize --rotate hadamard --format compressed-tensors`` (``api.run``) writes
    ``compressed/`` with the transform, and ``lrquant export`` of the run folder (float32) puts the online
    Hadamards back from ``results.json`` before exporting: both reload with the run's logits."""
    from lrquant import api
    from lrquant.config import CalibArgs, Recipe
    from lrquant.export import export_run

    recipe = Recipe(method="rtn", scheme=W4G32, calib=CalibArgs("default", 2, 32)).with_rotation("hadamard")
    res = api.run(str(tiny_model_dir), recipe, tmp_path / "run", progress=False, export_format="compressed-tensors")
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(res.model, ids)
    assert res.results["export"]["format"] == "compressed-tensors"
    half = load_compressed(tmp_path / "run" / "compressed")
    assert rel_err(logits(half, ids).float(), ref) <= 5e-3
    out = export_run(tmp_path / "run", tmp_path / "re-export")
    assert json.loads((out / "lrquant_export.json").read_text())["online_transforms"][0]["linears"] == 2
    assert rel_err(logits(load_compressed(out), ids), ref) <= 1e-5
    with pytest.raises(LrquantError, match="online input transform OnlineHadamard"):
        export_run(tmp_path / "run", export_format="gguf")
