"""Test-time adaptation (LRQuant).

A model calibrated on one corpus and evaluated on another adapts the transform and clipping parameters
of its last block(s) on the *unlabeled* evaluation stream, against the FP model's block outputs, for a
few steps (the method's loss: MSE + NLC for LRQuant), then is evaluated. The adapted block sees its real
inputs: the evaluation tokens propagated through the quantized model up to that block. No labels are used.

It needs, for each adapted block, the FP block and the calibrated parameter values, which a learned method
keeps when its recipe has the post-step ``tta`` with ``blocks = K`` (see ``LearnedMethod.tta_state``). Adaptation
re-runs the method's own block step on the new stream, warm-started from the calibrated values.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch.base import get_mapping, set_submodule
from .config import TrainArgs, TTAStep
from .engine import BlockContext, BlockReport, block_seed, capture_block_inputs, run_stream, to_device
from .errors import ConfigError, DataError, UnsupportedArchitectureError


@dataclass
class TTAReport:
    seconds: float
    blocks: list[int]
    init_loss: list[float] = field(default_factory=list)
    final_loss: list[float] = field(default_factory=list)


def adapt(
    q_model: nn.Module, fp_model: nn.Module, method, tokens: torch.Tensor, cfg: TTAStep,
    device: str | torch.device = "cpu", held_out: int = 0,
) -> TTAReport:
    """Adapt the last ``cfg.blocks`` blocks of ``q_model`` in place on ``tokens [1, T]``.

    The adaptation windows are the *last* ``cfg.windows x cfg.seqlen`` tokens of the stream; ``held_out``
    leading tokens (the ones the caller scores) must stay out of them, so adaptation and scoring never
    see the same text.

    ``method`` is the (learned) method object that quantized ``q_model`` with ``tta_blocks >= cfg.blocks``.
    Token streams through one block list only (staged mappings are refused).
    """
    t0 = time.time()
    device = torch.device(device)
    mapping = get_mapping(q_model)
    if mapping.stages is not None:
        raise UnsupportedArchitectureError(
            f"{mapping.family}: test-time adaptation runs on token streams through one block list, not on "
            "a staged (hierarchical) model")
    q_slots = mapping.block_list(q_model)
    q_blocks = [b for _, b in q_slots]
    fp_blocks = [b for _, b in mapping.block_list(fp_model)]
    n = len(q_blocks)
    first = n - cfg.blocks
    state = getattr(method, "tta_state", {})
    missing = [i for i in range(first, n) if "params" not in state.get(i, {})]
    if missing:
        raise ConfigError(
            f"no TTA state for blocks {missing}: quantize with a learned method and a tta post-step with blocks >= "
            f"{cfg.blocks} in the same process (a resumed run restores weights, not training state)")
    need = cfg.windows * cfg.seqlen
    if tokens.shape[1] - held_out < need:
        raise DataError(f"TTA needs {need} evaluation tokens ({cfg.windows} x {cfg.seqlen}) after the {held_out} "
                        f"scored ones, the stream has {tokens.shape[1]}")
    windows = tokens[0, tokens.shape[1] - need:].reshape(cfg.windows, cfg.seqlen)

    with torch.no_grad():
        fp_in, kwargs = capture_block_inputs(fp_model, mapping, windows, device)
        q_in, _ = capture_block_inputs(q_model, mapping, windows, device)
        kwargs = to_device(kwargs, device)
        fp_in, q_in = fp_in.to(device), q_in.to(device)
        for i in range(first):
            fp_in = run_stream(fp_blocks[i].to(device), fp_in, kwargs, device)
            q_in = run_stream(q_blocks[i].to(device), q_in, kwargs, device)
            fp_blocks[i].to("cpu")
            q_blocks[i].to("cpu")

    recipe = copy.deepcopy(method.recipe)
    recipe.train = TrainArgs(epochs=cfg.steps, batch_size=1, lr=recipe.train.lr,
                             weight_decay=recipe.train.weight_decay, seed=recipe.train.seed)
    saved_lr, saved_tta = dict(method.lr), method.tta_blocks
    method.lr = {k: (cfg.lr if cfg.lr is not None else v * 0.1) for k, v in method.lr.items()}
    method.tta_blocks = 0
    report = TTAReport(seconds=0.0, blocks=list(range(first, n)))
    try:
        for i in range(first, n):
            block = copy.deepcopy(state[i]["fp_block"]).to(device)
            with torch.no_grad():
                fp_out = run_stream(fp_blocks[i].to(device), fp_in, kwargs, device)
            fp_blocks[i].to("cpu")
            ctx = BlockContext(
                index=i, name=q_slots[i][0], block=block, mapping=mapping, config=q_model.config,
                recipe=recipe, fp_in=fp_in, q_in=q_in, fp_out=fp_out, kwargs=kwargs, device=device,
                generator=torch.Generator().manual_seed(block_seed(recipe.train.seed, i) + 1),
                report=BlockReport(block=i), block_list=q_blocks,
            )
            method.warm_start = state[i]["params"]
            method.quantize_block(ctx)
            set_submodule(q_model, q_slots[i][0], block.to("cpu"))
            q_blocks[i] = block
            report.init_loss.append(ctx.report.init_loss)
            report.final_loss.append(ctx.report.final_loss)
            with torch.no_grad():
                q_in = run_stream(block.to(device), q_in, kwargs, device)
            block.to("cpu")
            fp_in = fp_out
    finally:
        method.lr, method.tta_blocks, method.warm_start = saved_lr, saved_tta, None
    report.seconds = round(time.time() - t0, 2)
    return report
