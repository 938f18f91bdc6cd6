"""Learned residual rotation (SpinQuant's R1, trained here on a block-local proxy): an orthogonal
``R [H, H]`` trained by Cayley SGD on the Stiefel manifold (:func:`~lrquant.quant.stiefel.cayley_step`) from
the randomized Hadamard, then folded exactly by the rotation pre-step's surgery
(:func:`~lrquant.transforms.rotation.rotate_model` with ``residual=``) like the Hadamard it replaces; the
online Hadamards (down_proj input, optional value path) are unchanged.

Objective (the model's norms are already fused, so every norm output is ``rms(r)`` and the rotated model
sees ``rms(r) R``): over the calibration tokens captured at every attention-norm and MLP-norm output
``X [T, H]`` (``tokens`` per sample and site, seeded) and every weight that reads or writes the residual,

``L(R) = sum_sites |Q_a(X R) - X R|^2 / |X|^2 + sum_readers |Q_w(W R) - W R|^2 / |W|^2
+ sum_writers |Q_w(R^T W) - R^T W|^2 / |W|^2``

with the scheme's activation (per token) and weight fake quantizers (straight-through rounding; the
gradient flows through the ranges). Each step draws ``blocks_per_step`` blocks. The result is kept only if
its full objective is below the Hadamard's (never worse than the initialisation).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..arch.base import ArchMapping
from ..config import QuantArgs, Scheme
from ..errors import ConfigError
from ..quant.hadamard import hadamard_matrix
from ..quant.primitives import fake_quant_rows
from ..quant.stiefel import cayley_step

log = logging.getLogger("lrquant")


@torch.no_grad()
def capture_norm_outputs(model: nn.Module, mapping: ArchMapping, calib: torch.Tensor, tokens: int,
                         seed: int) -> list[list[torch.Tensor]]:
    """Per block ``[X_attn [T, H], X_mlp [T, H]]``: the inputs of q and of the first MLP input linear (the
    fused norms' outputs), ``tokens`` random positions of each calibration sample ``calib [N, L]``."""
    gen = torch.Generator().manual_seed(seed)
    blocks = mapping.block_list(model)
    store: list[list[list[torch.Tensor]]] = [[[], []] for _ in blocks]

    def hook_for(i: int, j: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            idx = torch.randperm(x.shape[0], generator=gen)[:tokens]
            store[i][j].append(x[idx].cpu())
        return hook

    handles = []
    for i, (_, block) in enumerate(blocks):
        handles.append(block.get_submodule(mapping.q).register_forward_pre_hook(hook_for(i, 0)))
        handles.append(block.get_submodule(mapping.mlp_in[0]).register_forward_pre_hook(hook_for(i, 1)))
    try:
        for row in calib:
            model(row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [[torch.cat(site) for site in sites] for sites in store]


def _rel_err(y: torch.Tensor, args: QuantArgs, rows_are_tokens: bool) -> torch.Tensor:
    strategy = args.strategy if not rows_are_tokens else "token"
    q = fake_quant_rows(y, args.num_bits, args.symmetric, strategy, args.group_size)
    return (q - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-20)


class RotationObjective:
    """The proxy loss of the module docstring over the captured activations and the model's weights."""

    def __init__(self, model: nn.Module, mapping: ArchMapping, acts: list[list[torch.Tensor]], scheme: Scheme) -> None:
        self.acts, self.scheme = acts, scheme
        self.readers: list[list[torch.Tensor]] = []
        self.writers: list[list[torch.Tensor]] = []
        for _, block in mapping.block_list(model):
            self.readers.append([block.get_submodule(p).weight.detach().float()
                                 for p in (mapping.q, mapping.k, mapping.v, *mapping.mlp_in)])
            self.writers.append([block.get_submodule(p).weight.detach().float() for p in (mapping.o, mapping.mlp_out)])

    def block_loss(self, r: torch.Tensor, i: int) -> torch.Tensor:
        loss = r.new_zeros(())
        a, w = self.scheme.input_activations, self.scheme.weights
        if a is not None:
            loss = loss + sum(_rel_err(x @ r, a, True) for x in self.acts[i])
        if w is not None:
            loss = loss + sum(_rel_err(wt @ r, w, False) for wt in self.readers[i])
            loss = loss + sum(_rel_err(r.T @ wt, w, False) for wt in self.writers[i])
        return loss

    @torch.no_grad()
    def total(self, r: torch.Tensor) -> float:
        return float(sum(self.block_loss(r, i) for i in range(len(self.acts))))


def learn_rotation(model: nn.Module, mapping: ArchMapping, calib: torch.Tensor, scheme: Scheme, *, seed: int,
                   steps: int, lr: float, tokens: int = 256, blocks_per_step: int = 4) -> torch.Tensor:
    """The learned ``R [H, H]`` (float64, orthogonal) for the norm-fused ``model`` (see module docstring);
    the randomized Hadamard ``hadamard_matrix(H, seed)`` when training does not lower the objective."""
    if not isinstance(calib, torch.Tensor):
        raise ConfigError("rotation.kind learned needs token-id calibration data ([N, L])")
    acts = capture_norm_outputs(model, mapping, calib, tokens, seed)
    objective = RotationObjective(model, mapping, acts, scheme)
    start = hadamard_matrix(acts[0][0].shape[-1], seed)
    r = start.clone()
    gen = torch.Generator().manual_seed(seed)
    n_blocks = len(acts)
    for step in range(steps):
        chosen = torch.randperm(n_blocks, generator=gen)[: min(blocks_per_step, n_blocks)].tolist()
        rf = r.float().requires_grad_(True)
        loss = sum(objective.block_loss(rf, i) for i in chosen)
        (grad,) = torch.autograd.grad(loss, rf)
        step_lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        r = cayley_step(r, grad.double(), step_lr)
    before, after = objective.total(start.float()), objective.total(r.float())
    log.info("learned rotation: proxy loss %.4g -> %.4g (Hadamard init)", before, after)
    return r if after < before else start


__all__ = ["RotationObjective", "capture_norm_outputs", "learn_rotation"]
