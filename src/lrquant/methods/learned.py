"""Shared machinery of the learned block-wise methods: activation statistics, SmoothQuant scales,
the training loop with rollback on non-finite losses, and the fold."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .. import distributed as ddp
from ..arch.base import SmoothPair
from ..losses import combined, massive_token_mask
from ..quant.observers import MinMaxObserver
from ..quant.quantizers import UniformQuantizer, quant_linears, quantization_disabled
from ..transforms import Transform, copy_block, fold_block
from .base import Method
from .rounding import moves_codes, prepare_learned

if TYPE_CHECKING:
    from ..engine import BlockContext

log = logging.getLogger("lrquant")

LR_RETRIES = 2
LR_BACKOFF = 0.1


@torch.no_grad()
def observe_inputs(ctx: BlockContext, hooks: list[tuple[nn.Module, Any]], stream: torch.Tensor,
                   precision: contextlib.AbstractContextManager) -> None:
    """Run ``stream [N, L, H]`` through the block one sample at a time inside ``precision`` (e.g.
    :func:`quantization_disabled`) with forward pre-hooks ``(module, hook)`` attached, then detach them."""
    handles = [m.register_forward_pre_hook(h) for m, h in hooks]
    try:
        with precision:
            for idx in ctx.batches(1, shuffle=False):
                ctx.forward(stream[idx])
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def channel_stats(ctx: BlockContext, pairs: tuple[SmoothPair, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-channel ``min``/``max``/``absmax`` of the channels each pair transforms, on the FP stream.

    Keys are ``pair.prev``. ``heads``: the o_proj input reduced to kv channels ``[KV * D]`` (max over the
    query heads of each group); ``qk``: not collected (initialised to ones).
    """
    observed = [p for p in pairs if p.kind != "qk"]
    observers = {p.prev: MinMaxObserver() for p in observed}

    def hook_for(observer: MinMaxObserver):
        def hook(_m: nn.Module, args: tuple) -> None:
            observer.update(args[0].float())
        return hook

    hooks = [(ctx.block.get_submodule(p.nexts[0]), hook_for(observers[p.prev])) for p in observed]
    observe_inputs(ctx, hooks, ctx.fp_in, quantization_disabled(ctx.block))
    for observer in observers.values():
        observer.all_reduce()
    n, kv, hd = ctx.mapping.heads(ctx.config, ctx.block)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for pair in observed:
        lo, hi = observers[pair.prev].min, observers[pair.prev].max
        if lo is None:  # the stream never reached this pair's linears
            continue
        if pair.kind == "heads":
            group = n // kv  # [H * D] -> [KV, group, D] -> [KV * D] (min/max commute with this reduction)
            lo = lo.reshape(kv, group, hd).amin(1).reshape(-1)
            hi = hi.reshape(kv, group, hd).amax(1).reshape(-1)
        stats[pair.prev] = {"min": lo, "max": hi, "absmax": torch.maximum(lo.abs(), hi.abs())}
    return stats


def weight_absmax(ctx: BlockContext, pair: SmoothPair) -> torch.Tensor:
    """Max |W| per input channel over the pair's next linears (``heads``: reduced to kv channels)."""
    w = torch.cat([ctx.block.get_submodule(n).weight.detach().abs() for n in pair.nexts], 0).amax(0).float()
    if pair.kind == "heads":
        n, kv, hd = ctx.mapping.heads(ctx.config, ctx.block)
        w = w.reshape(kv, n // kv, hd).amax(1).reshape(-1)
    return w


def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: ``s = max|X|^alpha / max|W|^(1 - alpha)``, clamped to ``[1e-5, 1e5]``."""
    s = act_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp(1e-5, 1e5)


class SignSGD(torch.optim.Optimizer):
    """Signed gradient descent, ``p -= lr * sign(grad)`` (auto-round's optimizer for rounding offsets and
    clip factors): each step moves every parameter with a non-zero gradient by exactly its group's lr."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ARG002  (the Optimizer signature)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@dataclass
class LearnedOptions:
    """``amp``: bf16 autocast of the training forward (the targets, streams and the fold stay fp32):
    ``None`` on CUDA only, ``true`` on any device (worth it on CPUs with bf16 units, e.g. avx512_bf16 or
    AMX, where a bf16 matmul is several times faster), ``false`` never."""

    amp: bool | None = None


class LearnedMethod(Method):
    """Block-wise training of quantizer and transform parameters against the FP block output.

    Subclasses choose the transforms (:meth:`make_transforms`) and their initialisation; the recipe's
    ``loss`` (terms, second target, token mask), ``train`` (steps, lr per group, schedule, keep-best),
    ``clip`` and ``rounding`` sections configure the rest. Every learnable piece declares its parameter
    groups (``learnable()`` on quantizers and transforms), the loop only asks.
    """

    Options: ClassVar[type] = LearnedOptions
    uses_lwc = True
    supports_tta: ClassVar[bool] = True
    roundings: ClassVar[tuple[str, ...]] = ("rtn", "gptq", "learned")
    default_lr: ClassVar[dict[str, float]] = {"lwc": 1e-2, "let": 5e-3, "rot": 1e-3, "round": 5e-3}

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        self.lr = {**self.default_lr, **recipe.train.lr}
        self.online_ops: list[str] = []
        # test-time adaptation: for the last ``tta.blocks`` blocks keep the FP block and the learned
        # parameter values (see lrquant.tta); ``warm_start`` seeds the parameters instead of the init
        self.tta_blocks = recipe.tta.blocks if recipe.tta is not None else 0
        self.tta_state: dict[int, dict[str, Any]] = {}
        self.warm_start: list[torch.Tensor] | None = None
        self.mask: torch.Tensor | None = None

    # ---- to override ---------------------------------------------------------------------------------
    def make_transforms(self, ctx: BlockContext) -> list[Transform]:
        return []

    def loss_terms(self) -> dict[str, float]:
        return self.recipe.loss.terms()

    def targets(self, ctx: BlockContext) -> list[tuple[torch.Tensor, float]]:
        """``[(target [N, L, H], weight)]``: FP block on FP input, plus optionally on quantized input."""
        out = [(ctx.fp_out, 1.0)]
        w = float(self.recipe.loss.q_target or 0.0)
        if w > 0:
            with torch.no_grad(), quantization_disabled(ctx.block):
                from ..engine import run_stream

                out.append((run_stream(ctx.block, ctx.q_in, ctx.kwargs, ctx.device, args=ctx.args), w))
        return out

    def token_mask(self, ctx: BlockContext) -> torch.Tensor | None:
        """``[N, L]`` tokens the loss counts (``loss.mask``), or ``None`` for all; the kept share and the
        masked positions go to the block report."""
        if self.recipe.loss.mask == "none" or ctx.fp_out.dim() != 3:
            return None
        mask = massive_token_mask(ctx.fp_out, self.recipe.loss.mask_ratio)
        dropped = int((~mask).sum())
        if dropped:
            ctx.report.notes.append(f"loss mask: {dropped} of {mask.numel()} tokens left out (massive norm)")
        return mask

    # ---- the loop -----------------------------------------------------------------------------------
    def trainable(self, ctx: BlockContext, transforms: list[Transform]) -> list[dict[str, Any]]:
        """Parameter groups ``[{params, lr, name}]`` declared by the block's quantizers and transforms."""
        found: dict[str, list[torch.nn.Parameter]] = {}
        for m in ctx.block.modules():
            if isinstance(m, UniformQuantizer):
                for name, ps in m.learnable().items():
                    if name != "lwc" or self.recipe.clip.learn:
                        found.setdefault(name, []).extend(ps)
        for t in transforms:
            for name, ps in t.learnable().items():
                found.setdefault(name, []).extend(ps)
        return [{"params": ps, "lr": self.lr[name], "name": name} for name, ps in found.items() if ps]

    def block_loss(self, ctx: BlockContext, targets, idx: torch.Tensor) -> torch.Tensor:
        amp = self.opts.amp if self.opts.amp is not None else ctx.device.type == "cuda"
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            out = ctx.forward(ctx.q_in[idx])
        terms = self.loss_terms()
        mask = None if self.mask is None else self.mask[idx]
        return sum(w * combined(out, t[idx].to(ctx.device), terms, mask) for t, w in targets)

    @torch.no_grad()
    def eval_loss(self, ctx: BlockContext, targets) -> float:
        total = 0.0
        n = 0
        for idx in ctx.batches(ctx.recipe.train.batch_size, shuffle=False):
            total += float(self.block_loss(ctx, targets, idx)) * len(idx)
            n += len(idx)
        total, n = ddp.sum_scalars(total, n)  # over every rank's share
        return total / max(n, 1)

    def fit(self, ctx: BlockContext, targets, groups: list[dict[str, Any]],
            transforms: list[Transform] | tuple = ()) -> tuple[float, float]:
        """Train ``groups`` against ``targets``: rollback and lr back-off on non-finite losses, never end
        worse than the start (warm start from ``self.warm_start`` when set). Returns (initial, final) loss."""
        params = [p for g in groups for p in g["params"]]
        for p in params:
            p.requires_grad_(True)
        if self.warm_start is not None:
            with torch.no_grad():
                for p, w in zip(params, self.warm_start, strict=True):
                    p.copy_(w)
        initial = [p.detach().clone() for p in params]
        init = self.eval_loss(ctx, targets)
        if not params:
            return init, init
        scale_lr = 1.0
        best: tuple[float, list[torch.Tensor]] | None = None
        for attempt in range(LR_RETRIES + 1):
            ok, best = self._train(ctx, transforms, groups, params, targets, scale_lr)
            if ok:
                break
            self._restore(params, initial, transforms)
            scale_lr *= LR_BACKOFF
            msg = f"non-finite loss in block {ctx.index}; rolled back"
            msg += f", retrying with lr x{scale_lr:g}" if attempt < LR_RETRIES else " to its initialisation"
            log.warning(msg)
            ctx.report.notes.append(msg)
        if best is not None and best[1]:
            self._restore(params, best[1], ())
        final = self.eval_loss(ctx, targets)
        if not final <= init:
            self._restore(params, initial, transforms)
            ctx.report.notes.append(f"training raised the loss ({final:.4g} > {init:.4g}); kept the initialisation")
            final = init
        for p in params:
            p.requires_grad_(False)
        return init, final

    @staticmethod
    @torch.no_grad()
    def _restore(params, initial, transforms) -> None:
        for p, p0 in zip(params, initial, strict=True):
            p.copy_(p0)
        for t in transforms:
            t.set_epoch(0, 1)

    def quantize_block(self, ctx: BlockContext) -> None:
        n_blocks = len(ctx.block_list) if ctx.block_list is not None else 0
        keep_for_tta = self.tta_blocks > 0 and ctx.index >= n_blocks - self.tta_blocks
        if keep_for_tta:
            self.tta_state[ctx.index] = {"fp_block": copy.deepcopy(ctx.block).cpu()}
        targets = self.targets(ctx)
        self.mask = self.token_mask(ctx)
        transforms = self.make_transforms(ctx)
        for t in transforms:
            t.to(ctx.device)
            t.attach(ctx.block)
        for p in ctx.block.parameters():
            p.requires_grad_(False)
        if self.warm_start is None:
            self.init_clipping(ctx)
        if self.recipe.rounding.kind == "learned":
            prepare_learned(ctx.block)
        groups = self.trainable(ctx, transforms)
        params = [p for g in groups for p in g["params"]]
        # the rounded guard only differs from the loss guard when rounding moves codes after training
        judge = (self.recipe.train.guard == "rounded" and moves_codes(self.recipe.rounding.kind)
                 and self.warm_start is None)
        start = [p.detach().clone() for p in params] if judge else []
        ctx.report.init_loss, ctx.report.final_loss = self.fit(ctx, targets, groups, transforms)
        if judge and ctx.report.final_loss < ctx.report.init_loss:
            self.fold_round_judged(ctx, targets, params, start, transforms)
        else:
            fold_block(ctx.block)
            self.round_weights(ctx)
        if keep_for_tta:
            self.tta_state[ctx.index]["params"] = [p.detach().cpu().clone() for p in params]
        self.calibrate_static(ctx)
        self.mask = None

    def fold_round_judged(self, ctx: BlockContext, targets, params: list[torch.Tensor],
                          start: list[torch.Tensor], transforms: list[Transform]) -> None:
        """``train.guard: rounded``: fold and round the block twice, with the trained parameters (on a copy)
        and with ``start`` (the initialisation, in place), and keep the variant whose calibration loss is
        lower; ``params`` end holding the kept variant's values. The copy is folded first, while ``params``
        hold the trained values (a copied parametrization may still read the original parameters)."""
        trained = copy_block(ctx.block)
        block, ctx.block = ctx.block, trained
        try:
            fold_block(trained)
            self.round_weights(ctx)
            loss_trained = self.eval_loss(ctx, targets)
        finally:
            ctx.block = block
        kept = [p.detach().clone() for p in params]
        self._restore(params, start, transforms)
        fold_block(block)
        self.round_weights(ctx)
        loss_init = self.eval_loss(ctx, targets)
        keep_trained = loss_trained < loss_init
        if keep_trained:
            from ..engine import block_tensors, load_block_tensors

            load_block_tensors(block, block_tensors(trained))  # non-persistent quantizer buffers included
            errors = {name: lin.quant_error for name, lin in quant_linears(trained).items()}
            for name, lin in quant_linears(block).items():
                lin.quant_error = errors[name]
            self._restore(params, kept, ())
        else:
            ctx.report.final_loss = ctx.report.init_loss
        ctx.report.notes.append(f"guard after rounding: init {loss_init:.4g}, trained {loss_trained:.4g}; kept "
                                f"{'trained' if keep_trained else 'init'}")

    def steps(self, ctx: BlockContext) -> tuple[int, int]:
        """``(total optimizer steps, steps between best-iterate checks)`` for this block."""
        train = ctx.recipe.train
        per_epoch = math.ceil(ctx.q_in.shape[0] / train.batch_size)  # global batches, whatever the ranks
        total = train.iters or train.epochs * per_epoch
        check = max(1, train.iters // 8) if train.iters else per_epoch
        return total, check

    def _lr_factor(self, step: int, total: int) -> float:
        kind = self.recipe.train.lr_schedule
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * step / total))
        if kind == "linear":
            return 1.0 - step / total
        return 1.0

    def _train(self, ctx, transforms, groups, params, targets, scale_lr: float):
        """Returns ``(ok, best)``: ``ok`` False on a non-finite loss (the caller rolls back); ``best`` the
        ``(batch loss, parameter values)`` of the iterate with the lowest training-batch loss when
        ``train.keep_best`` (as auto-round keeps its best iterate: no extra forward), else ``None``."""
        total, check = self.steps(ctx)
        if not params or total == 0:
            return True, None
        train = ctx.recipe.train
        base = [g["lr"] * scale_lr for g in groups]
        param_groups = [{**g, "lr": lr} for g, lr in zip(groups, base, strict=True)]
        opt = (SignSGD(param_groups) if train.optimizer == "sign"
               else torch.optim.AdamW(param_groups, weight_decay=train.weight_decay))
        per_epoch = max(1, total if train.iters else total // max(train.epochs, 1))
        epochs = math.ceil(total / per_epoch)
        best = (math.inf, []) if train.keep_best else None
        step, running, count = 0, 0.0, 0
        while step < total:
            epoch = step // per_epoch
            for t in transforms:
                t.set_epoch(epoch, epochs)
            for idx in ctx.batches(train.batch_size):
                if step >= total:
                    break
                loss = self.block_loss(ctx, targets, idx)
                value = ddp.mean_scalar(loss.item())  # the global batch's loss: every rank decides alike
                if not math.isfinite(value):
                    return False, None
                if best is not None and value < best[0]:  # the parameters this batch loss was measured at
                    best = (value, [p.detach().clone() for p in params])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                ctx.all_reduce_grads(params)
                factor = self._lr_factor(step, total)
                for g, lr in zip(opt.param_groups, base, strict=True):
                    g["lr"] = lr * factor
                opt.step()
                step += 1
                running += value * len(idx)
                count += len(idx)
                if step % check == 0 or step == total:
                    ctx.report.losses.append(running / max(count, 1))
                    ctx.on_progress(f"step {step}/{total} loss {running / max(count, 1):.4g}")
                    running, count = 0.0, 0
        return True, best
