"""The block-wise engine. It knows no method by name.

For each transformer block, in order::

    fp_out  = block_fp(fp_in)            # FP targets (FP block on the FP stream)
    method.prepare_block(ctx)            # structure: wrap linears, attach quantizers/transforms
    method.quantize_block(ctx)           # train on (q_in -> fp_out), fold, freeze
    q_out   = block_q(q_in)              # push the quantized stream forward
    checkpoint(block)                    # every tensor of the block, atomically

Streams are ``[N, L, H]`` tensors (N calibration samples of L tokens). Hierarchical mappings (stages,
see :mod:`lrquant.arch.base`) also run each stage's *transition* (Swin's patch merging, ``[N, L, C] ->
[N, L/4, 2C]``) on both streams after the stage's last block; transitions are not quantized and stay in
full precision. Each block is called as ``block(x, *args, **kwargs)`` with the extra positional
arguments and keyword arguments it received in a full-precision forward (single block list: block 0's
keyword arguments, captured once, shared by every block; stages: captured per block and per transition
in one full forward of the first calibration sample, e.g. Swin's ``input_dimensions``). Only the current
block lives on the compute device; streams stay on the device while small and go to CPU otherwise.
Resuming replays the finished blocks (FP forward, restore the saved tensors, quantized forward, and the
transitions) in exactly the same order as the uninterrupted run, so a resumed run ends with bit-identical
weights. Every random choice inside a block uses a generator seeded from (seed, block index), so the
result does not depend on where a run was interrupted.

Data parallel (later): a method's training step averages gradients with ``ctx.all_reduce_grads`` when
``torch.distributed`` is initialised and shards samples by rank; the engine is otherwise unchanged.
Larger-than-RAM models: blocks are only touched through ``mapping.block_list`` one at a time, so a loader
that materialises block i from safetensors shards can sit behind the same loop (staged mappings would
also need the one full forward that captures their call arguments).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .arch.base import ArchMapping, get_mapping
from .config import Recipe
from .errors import LrquantError
from .io import atomic_save_tensors, atomic_write_json
from .quant.quantizers import quant_linears

log = logging.getLogger("lrquant")

STREAM_DEVICE_LIMIT_BYTES = 2 * 1024**3


class _Captured(Exception):
    """Raised by the block-0 pre-hook to stop the model forward once the inputs are captured."""


@dataclass
class BlockReport:
    """What one block's quantization did (goes into results.json)."""

    block: int
    init_loss: float | None = None
    final_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    out_rel_err: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class BlockContext:
    """Everything a method sees of one block.

    ``fp_in, q_in, fp_out``: ``[N, L, H]`` streams (``fp_in``/``fp_out`` ``None`` for a method whose
    ``needs_fp_stream`` is False); ``kwargs``: the keyword arguments the block needs
    (attention mask, position ids/embeddings), captured once, broadcast over the batch; ``args``: extra
    positional arguments after the hidden states (Swin: ``input_dimensions``). ``index``: position in
    ``mapping.block_list`` (over all stages); ``name``: the block's full dotted name.
    """

    index: int
    name: str
    block: nn.Module
    mapping: ArchMapping
    config: Any
    recipe: Recipe
    fp_in: torch.Tensor | None
    q_in: torch.Tensor
    fp_out: torch.Tensor | None
    kwargs: dict[str, Any]
    device: torch.device
    generator: torch.Generator
    report: BlockReport
    on_progress: Callable[[str], None] = lambda _msg: None
    block_list: Sequence[nn.Module] | None = None
    args: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on ``x: [B, L, H]`` (moved to the compute device) -> ``[B, L, H]``."""
        return run_block(self.block, x.to(self.device), self.kwargs, self.args)

    def batches(self, batch_size: int, shuffle: bool = True) -> Iterator[torch.Tensor]:
        """Sample indices ``[B]`` over ``N`` (this rank's shard under torch.distributed)."""
        n = self.q_in.shape[0]
        order = torch.randperm(n, generator=self.generator) if shuffle else torch.arange(n)
        if dist.is_available() and dist.is_initialized():
            order = order[dist.get_rank() :: dist.get_world_size()]
        for i in range(0, len(order), batch_size):
            yield order[i : i + batch_size]

    @staticmethod
    def all_reduce_grads(params: list[torch.Tensor]) -> None:
        """Average gradients across ranks (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device``, through nested tuples, lists and dicts (call arguments,
    model inputs); anything else is returned as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], args: tuple = ()) -> torch.Tensor:
    """One forward ``block(x, *args, **kwargs)``: ``x [B, L, H] -> [B, L', H']`` (tuple outputs reduced to
    the hidden states; ``L' = L, H' = H`` for a block, not for a stage transition)."""
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_stream(block: nn.Module, stream: torch.Tensor, kwargs: dict[str, Any], device: torch.device,
               batch_size: int = 1, args: tuple = ()) -> torch.Tensor:
    """Apply ``block`` to every sample of ``stream [N, L, H]`` -> ``[N, L', H']`` in ``stream``'s dtype; the
    output stays where the input was (a stage transition may change ``L`` and ``H``)."""
    out: torch.Tensor | None = None
    for i in range(0, stream.shape[0], batch_size):
        y = run_block(block, stream[i : i + batch_size].to(device), kwargs, args).to(stream.device)
        if out is None:
            out = stream.new_empty((stream.shape[0], *y.shape[1:]))
        out[i : i + batch_size] = y
    return out if out is not None else torch.empty_like(stream)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, mapping: ArchMapping, batches: torch.Tensor | list[dict[str, torch.Tensor]],
    device: torch.device, input_name: str = "input_ids",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model up to block 0 for every sample and keep block 0's inputs.

    ``batches``: ``[N, L]`` token ids (or a list of model-input dicts, e.g. pixel values) ->
    ``(hidden [N, L, H] on CPU, kwargs)``. The kwargs of the first sample are kept (same length for
    all samples, so they are identical); caches are dropped.
    """
    first_block = mapping.block_list(model)[0][1]
    for path in mapping.pre_blocks:
        model.get_submodule(path).to(device)
    captured: list[torch.Tensor] = []
    kwargs_holder: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach().to("cpu"))
        if not kwargs_holder:
            kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            kwargs_holder.update(to_device(kept, torch.device("cpu")))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        items = list(batches) if isinstance(batches, list) else [batches[i : i + 1] for i in range(batches.shape[0])]
        for item in items:
            inputs = to_device(item, device) if isinstance(item, dict) else {input_name: item.to(device)}
            try:
                model(**inputs, use_cache=False) if "use_cache" in _forward_params(model) else model(**inputs)
            except _Captured:
                pass
    finally:
        handle.remove()
        for path in mapping.pre_blocks:
            model.get_submodule(path).to("cpu")
    if not captured:
        raise LrquantError("block 0 was never reached while capturing calibration inputs")
    return torch.cat(captured, dim=0), kwargs_holder


_DROPPED_KWARGS = ("past_key_values", "past_key_value", "use_cache")


@torch.no_grad()
def capture_calls(
    model: nn.Module, mapping: ArchMapping, item: torch.Tensor | dict[str, torch.Tensor],
    input_name: str = "input_ids",
) -> dict[str, tuple[tuple, dict[str, Any]]]:
    """How every block and every stage transition is called: one full-precision forward of one sample
    (``item``: token ids ``[1, L]`` or a model-input dict) on the device the model is on, with forward
    pre-hooks. Returns ``{full dotted name: (positional args after the hidden states, kwargs)}``, on CPU,
    caches dropped. Used for hierarchical (staged) mappings, whose call arguments differ per stage."""
    names = [n for n, _ in mapping.block_list(model)] + list(mapping.transitions(model).values())
    calls: dict[str, tuple[tuple, dict[str, Any]]] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in calls:
                return
            kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            if not args:
                kept.pop("hidden_states", None)
            cpu = torch.device("cpu")
            calls[name] = (to_device(tuple(args[1:]), cpu), to_device(kept, cpu))
        return hook

    param = next(model.parameters(), None)
    where = param.device if param is not None else torch.device("cpu")
    inputs = to_device(item, where) if isinstance(item, dict) else {input_name: item.to(where)}
    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in names]
    try:
        model(**inputs, use_cache=False) if "use_cache" in _forward_params(model) else model(**inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in calls]
    if missing:
        raise LrquantError(f"never called during a full forward: {', '.join(missing)}")
    return calls


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


# ---- checkpoints -------------------------------------------------------------------------------------
def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) of ``block`` by name."""
    out = {n: p.detach() for n, p in block.named_parameters()}
    out.update({n: b.detach() for n, b in block.named_buffers()})
    return out


@torch.no_grad()
def load_block_tensors(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Restore :func:`block_tensors`; parameters absent from ``tensors`` are dropped (set to ``None``),
    tensors whose slot is ``None`` are created (e.g. a bias added by a fold)."""
    existing = dict(block.named_parameters())
    for name in existing:
        if name not in tensors:
            owner, _, attr = name.rpartition(".")
            setattr(block.get_submodule(owner) if owner else block, attr, None)
    buffers = dict(block.named_buffers())
    for name, value in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = block.get_submodule(owner_name) if owner_name else block
        if name in existing:
            existing[name].data = value.to(existing[name].device).clone()
        elif name in buffers or attr in owner._buffers:
            owner._buffers[attr] = value.clone()
        else:
            setattr(owner, attr, nn.Parameter(value.clone(), requires_grad=False))


def recipe_fingerprint(recipe: Recipe, model_name: str) -> str:
    data = json.dumps({"recipe": recipe.to_dict(), "model": model_name}, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


class Checkpointer:
    """``<run>/checkpoint/state.json`` + one safetensors file per finished block, all atomic."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint

    def state(self) -> dict[str, Any]:
        path = self.folder / "state.json"
        if not path.is_file():
            return {"fingerprint": self.fingerprint, "completed": -1, "reports": []}
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise LrquantError(
                f"checkpoint in {self.folder} was made with a different recipe or model; "
                "use another --output or drop --resume"
            )
        return state

    def save(self, index: int, block: nn.Module, reports: list[BlockReport]) -> None:
        """Block ``index``'s tensors, then the state: the reports, the sha256 of every block file (so a
        resume can tell a damaged file) and each block's per-layer weight errors (not tensors)."""
        path = self.folder / f"block_{index:04d}.safetensors"
        atomic_save_tensors(path, block_tensors(block))
        state = self.state() if (self.folder / "state.json").is_file() else {}
        digests = list(state.get("block_sha256", []))[:index] + [hashlib.sha256(path.read_bytes()).hexdigest()]
        errors = dict(state.get("layer_errors", {}))
        errors[str(index)] = {n: m.quant_error for n, m in quant_linears(block).items() if m.quant_error is not None}
        atomic_write_json(
            self.folder / "state.json",
            {"fingerprint": self.fingerprint, "completed": index, "reports": [asdict(r) for r in reports],
             "block_sha256": digests, "layer_errors": errors},
        )

    def restore_layer_errors(self, index: int, block: nn.Module) -> None:
        """Put back block ``index``'s per-layer weight errors (``QuantLinear.quant_error``)."""
        errors = self.state().get("layer_errors", {}).get(str(index), {})
        for name, lin in quant_linears(block).items():
            if name in errors:
                lin.quant_error = errors[name]

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"block_{index:04d}.safetensors"))


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class EngineResult:
    reports: list[BlockReport]
    seconds: float
    mapping: ArchMapping


def block_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def quantize_blocks(
    model: nn.Module,
    method: Any,
    recipe: Recipe,
    calib: torch.Tensor | list[dict[str, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    model_name: str = "",
    progress: bool = True,
) -> EngineResult:
    """Quantize ``model`` in place, block by block, with ``method`` (see module docstring).

    ``calib``: ``[N, L]`` token ids or a list of model-input dicts. Returns the per-block reports.
    """
    device = torch.device(device)
    t0 = time.time()
    mapping = get_mapping(model)
    slots = mapping.block_list(model)
    blocks = [block for _, block in slots]
    transitions = mapping.transitions(model)
    method.prepare_model(model, mapping, calib)
    fp_in, kwargs = capture_block_inputs(model, mapping, calib, device)
    on_device = fp_in.numel() * fp_in.element_size() * 3 <= STREAM_DEVICE_LIMIT_BYTES
    stream_device = device if on_device else torch.device("cpu")
    fp_in = fp_in.to(stream_device)
    q_in = fp_in.clone()
    # a method that needs no full-precision targets or statistics (RTN, GPTQ) runs the quantized stream only
    keep_fp = method.needs_fp_stream
    if not keep_fp:
        fp_in = None
    kwargs = to_device(kwargs, device)
    if mapping.stages is None:  # one block list: block 0's kwargs, captured once, serve every block
        calls = {name: ((), kwargs) for name, _ in slots}
    else:  # stages: per-block / per-transition call arguments from one full forward of the first sample
        first = calib[0] if isinstance(calib, list) else calib[:1]
        calls = {name: (to_device(a, device), to_device(kw, device)) for name, (a, kw) in
                 capture_calls(model, mapping, first).items()}

    ckpt = Checkpointer(checkpoint_dir, recipe_fingerprint(recipe, model_name)) if checkpoint_dir else None
    completed = -1
    reports: list[BlockReport] = []
    if ckpt is not None and resume:
        state = ckpt.state()
        completed = state["completed"]
        reports = [BlockReport(**r) for r in state["reports"]]
        if completed >= 0:
            log.info("resuming after block %d of %d", completed, len(blocks))

    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=not progress, dynamic_ncols=True)
    for index, (name, block) in enumerate(slots):
        args, kwargs = calls[name]
        block.to(device)
        fp_out = run_stream(block, fp_in, kwargs, device, args=args) if keep_fp else None
        ctx = BlockContext(
            index=index, name=name, block=block, mapping=mapping, config=model.config,
            recipe=recipe, fp_in=fp_in, q_in=q_in, fp_out=fp_out, kwargs=kwargs, device=device,
            generator=torch.Generator().manual_seed(block_seed(recipe.train.seed, index)),
            report=BlockReport(block=index),
            on_progress=lambda msg, i=index: bar.set_postfix_str(f"block {i}: {msg}", refresh=True),
            block_list=blocks, args=args,
        )
        method.prepare_block(ctx)
        if index <= completed:
            load_block_tensors(block, ckpt.load(index))
            ckpt.restore_layer_errors(index, block)
            method.restore_block(ctx)
        else:
            tb = time.time()
            method.quantize_block(ctx)
            ctx.report.seconds = round(time.time() - tb, 3)
        q_out = run_stream(block, q_in, kwargs, device, args=args)
        if index > completed:
            if fp_out is not None:
                ctx.report.out_rel_err = float((q_out - fp_out).pow(2).sum() / fp_out.pow(2).sum().clamp_min(1e-20))
            reports.append(ctx.report)
            if ckpt is not None:
                ckpt.save(index, block, reports)
            loss = ctx.report.final_loss if ctx.report.final_loss is not None else ctx.report.out_rel_err
            if loss is not None:
                bar.set_postfix_str(f"block {index}: loss {loss:.3g}", refresh=False)
        fp_in, q_in = fp_out, q_out
        block.to("cpu")
        if index in transitions:  # between stages: the same full-precision module on both streams
            if keep_fp:
                fp_in, q_in = run_transition(model, transitions[index], calls, (fp_in, q_in), device)
            else:
                (q_in,) = run_transition(model, transitions[index], calls, (q_in,), device)
        bar.update(1)
    bar.close()
    method.finalize_model(model, mapping)
    return EngineResult(reports=reports, seconds=time.time() - t0, mapping=mapping)


@torch.no_grad()
def run_transition(
    model: nn.Module, name: str, calls: dict[str, tuple[tuple, dict[str, Any]]],
    streams: tuple[torch.Tensor, ...], device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Apply the stage transition ``name`` (kept in full precision) to each stream ``[N, L, C]`` ->
    ``[N, L', C']`` with its captured call arguments; outputs stay where the inputs were."""
    module = model.get_submodule(name).to(device)
    args, kwargs = calls[name]
    try:
        return tuple(run_stream(module, s, kwargs, device, args=args) for s in streams)
    finally:
        module.to("cpu")


def layer_errors(model: nn.Module) -> dict[str, float]:
    """Relative weight quantization error ``||W_q - W|| / ||W||`` per frozen linear (recorded at freeze)."""
    return {n: float(m.quant_error) for n, m in quant_linears(model).items() if m.quant_error is not None}
