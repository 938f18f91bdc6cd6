"""The typed, versioned recipe: presets expand, every section refuses bad input before any work,
version-1 files migrate, and one document expresses method + rotation + stages + TTA."""

from __future__ import annotations

import pytest
import yaml

from lrquant.config import BUILTIN_RECIPES, Recipe, RotationStep, TTAStep
from lrquant.errors import ConfigError

FULL = """
version: 2
pre:
  - rotation: {kind: hadamard, seed: 3}
method: lrquant_plus
options: {init: log, vectors: [q, o, up], scale_param: log}
clip: {init: mse}
rounding: {kind: gptq, damp: 0.02}
loss: {mask: massive, nlc: 0.5}
train: {iters: 40, lr_schedule: cosine, keep_best: true, lr: {let: 0.02}}
post:
  - tta: {blocks: 2, steps: 10, lr: 0.02}
"""


def test_one_document_expresses_rotation_method_stages_and_tta(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(FULL)
    r = Recipe.load(path)
    assert r.rotation == RotationStep("hadamard", 3) and r.tta == TTAStep(steps=10, lr=0.02, blocks=2)
    assert r.rounding.kind == "gptq" and r.rounding.damp == 0.02 and r.clip.init == "mse"
    # the preset fills what the file leaves out, and the expansion is what gets written
    assert r.clip.learn is True and r.loss.mse == 1.0 and r.loss.q_target == 1.0 and r.loss.nlc == 0.5
    assert r.options["alpha"] == 0.5 and r.options["shift"] is True
    r.save(tmp_path / "as_run.yaml")
    again = Recipe.load(tmp_path / "as_run.yaml")
    assert again == r and yaml.safe_load((tmp_path / "as_run.yaml").read_text())["version"] == 2


@pytest.mark.parametrize("patch, message", [
    ({"rounding": {"kind": "gptqq"}}, "unknown rounding.kind .gptqq.; available: gptq, learned, rtn"),
    ({"loss": {"nlcc": 1}}, "unknown loss field"),
    ({"train": {"iters": "many"}}, "train.iters: expected int"),
    ({"train": {"lr": {"lett": 0.1}}}, "train.lr group must be one of"),
    ({"train": {"lr_schedule": "step"}}, "train.lr_schedule must be one of"),
    ({"clip": {"min_factor": 0.0}}, "clip.min_factor must be in"),
    ({"options": {"alpah": 0.5}}, "unknown options of method lrquant_plus field.*alpah"),
    ({"options": {"vectors": ["q", "x"]}}, "options.vectors entry must be one of"),
    ({"options": {"alpha": "half"}}, "alpha: expected float"),
    ({"pre": [{"rotation": {"kind": "givens"}}]}, "pre.rotation.kind must be one of hadamard"),
    ({"pre": [{"spin": {}}]}, "unknown pre step 'spin'"),
    ({"post": [{"tta": {"blocks": 0}}]}, "TTA steps, blocks"),
    ({"version": 7}, "recipe version 7 is not supported"),
    ({"colour": "red"}, "unknown recipe keys: colour"),
])
def test_typos_anywhere_fail_with_the_field_named(patch, message):
    data = yaml.safe_load(FULL)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


def test_method_cross_checks():
    with pytest.raises(ConfigError, match="rounding.kind 'learned' is not available with method rtn"):
        Recipe(method="rtn", rounding={"kind": "learned"})
    with pytest.raises(ConfigError, match="clip.learn needs a learned method"):
        Recipe(method="smoothquant", clip={"learn": True})
    assert Recipe(method="rtn", rounding={"kind": "gptq"}, clip={"init": "mse"}).clip.learn is False


def test_version_1_files_migrate():
    old = {"method": "lrquant", "options": {"rotate": "hadamard", "rotate_seed": 5, "loss": {"mse": 1},
                                            "q_target": 0.5, "alpha": 0.6}}
    r = Recipe.from_dict(old)
    assert r.version == 2 and r.rotation == RotationStep("hadamard", 5)
    assert (r.loss.mse, r.loss.nlc, r.loss.q_target) == (1, 0.0, 0.5) and r.options["alpha"] == 0.6
    with pytest.raises(ConfigError, match="TTA is a post-step"):
        Recipe.from_dict({"method": "lrquant", "options": {"tta_blocks": 1}})
    for path in BUILTIN_RECIPES.glob("*.yaml"):   # every shipped file loads
        Recipe.load(path)


def test_changing_the_method_resets_what_the_preset_resolved():
    r = Recipe()                                   # rtn: no LWC, plain MSE
    plus = r.with_method("lrquant_plus")
    assert plus.clip.learn is True and plus.loss.nlc == 1.0 and plus.loss.q_target == 1.0
    assert plus.with_method("rtn").clip.learn is False
    assert r.with_rotation("hadamard", 2).rotation.seed == 2 and r.with_rotation("hadamard").with_rotation(
        "none").rotation is None
    assert plus.with_tta(TTAStep(blocks=3)).tta.blocks == 3
    assert plus.with_options({"loss.mask": "massive", "alpha": 0.7}).options["alpha"] == 0.7
    with pytest.raises(ConfigError, match="unknown option section"):
        plus.with_options({"sched.iters": 3})
