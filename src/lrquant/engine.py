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

Data parallel (:mod:`lrquant.distributed`, under torchrun): every rank holds the whole streams; each
global batch of ``train.batch_size`` samples is split across the ranks (:meth:`BlockContext.batches`),
gradients are averaged (``ctx.all_reduce_grads``), stream forwards are computed on a shard per rank and
gathered (:func:`forward_stream`), statistics are reduced where they are collected, and only rank 0 writes
the checkpoint. Streams are allocated by a :class:`~lrquant.streams.StreamStore` (dtype, RAM budget,
memory-mapped files beyond it). Larger-than-RAM models: a :class:`BlockSource` materialises each block
(e.g. from safetensors shards, :mod:`lrquant.streaming`) only when the loop reaches it and takes it back
when it is finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import distributed as ddp
from .arch.base import ArchMapping, get_mapping
from .config import Recipe
from .errors import LrquantError
from .io import atomic_save_tensors, atomic_write_json, sha256_file
from .quant.quantizers import quant_linears
from .streams import StreamStore

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
    store: StreamStore | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on ``x: [B, L, H]`` (moved to the compute device) -> ``[B, L, H]``."""
        return run_block(self.block, x.to(self.device), self.kwargs, self.args)

    def batches(self, batch_size: int, shuffle: bool = True) -> Iterator[torch.Tensor]:
        """Sample indices ``[B]`` over ``N``: global batches of ``batch_size`` samples (at least one per
        rank), of which this rank gets every ``world``-th (the whole batch in one process). File-backed
        streams give back their resident pages after each batch."""
        n = self.q_in.shape[0]
        order = torch.randperm(n, generator=self.generator) if shuffle else torch.arange(n)
        w, r = ddp.world(), ddp.rank()
        for i in range(0, n, max(batch_size, w)):
            yield order[i : i + max(batch_size, w)][r::w]
            if self.store is not None:
                self.store.release(self.fp_in, self.q_in, self.fp_out)

    @staticmethod
    def all_reduce_grads(params: list[torch.Tensor]) -> None:
        """Average gradients across ranks (no-op without torch.distributed)."""
        if not ddp.active():
            return
        for p in params:
            if p.grad is not None:
                ddp.all_reduce_(p.grad, "mean")


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
    the hidden states; ``L' = L, H' = H`` for a block, not for a stage transition). ``x`` is cast to the
    block's floating dtype — the dtype holding most of its parameter elements, i.e. its weights', not a
    quantizer's small float32 parameters (streams may be kept in a narrower one)."""
    sizes: dict[torch.dtype, int] = {}
    for p in block.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    dtype = max(sizes, key=sizes.__getitem__) if sizes else x.dtype
    out = block(x.to(dtype), *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_stream(block: nn.Module, stream: torch.Tensor, kwargs: dict[str, Any], device: torch.device,
               batch_size: int = 1, args: tuple = (), store: StreamStore | None = None) -> torch.Tensor:
    """Apply ``block`` to every sample of ``stream [N, L, H]`` -> ``[N, L', H']`` in ``stream``'s dtype; the
    output stays where the input was (a stage transition may change ``L`` and ``H``), allocated by
    ``store`` when given (which then also releases file-backed pages as it goes)."""
    out: torch.Tensor | None = None
    for i in range(0, stream.shape[0], batch_size):
        y = run_block(block, stream[i : i + batch_size].to(device), kwargs, args).to(stream.device)
        if out is None:
            shape = (stream.shape[0], *y.shape[1:])
            out = store.empty(shape, like=stream) if store is not None else stream.new_empty(shape)
        out[i : i + batch_size] = y
        if store is not None:
            store.release(stream, out)
    return out if out is not None else torch.empty_like(stream)


@torch.no_grad()
def forward_stream(block: nn.Module, stream: torch.Tensor, kwargs: dict[str, Any], device: torch.device,
                   store: StreamStore, args: tuple = ()) -> torch.Tensor:
    """:func:`run_stream` under data parallel: each rank runs its shard of ``stream [N, L, H]`` and the
    outputs are gathered, so every rank holds the whole ``[N, L', H']`` (allocated by ``store``)."""
    if not ddp.active():
        return run_stream(block, stream, kwargs, device, args=args, store=store)
    part = run_stream(block, stream[ddp.shard(stream.shape[0])], kwargs, device, args=args)
    out = store.empty((stream.shape[0], *part.shape[1:]), like=stream)
    ddp.gather_into(out, part)
    store.release(out)
    return out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, mapping: ArchMapping, batches: torch.Tensor | list[dict[str, torch.Tensor]],
    device: torch.device, input_name: str = "input_ids", store: StreamStore | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model up to block 0 for every sample and keep block 0's inputs.

    ``batches``: ``[N, L]`` token ids (or a list of model-input dicts, e.g. pixel values) ->
    ``(hidden [N, L, H] on CPU, kwargs)``, allocated by ``store`` when given (written sample by sample,
    never held twice). The kwargs of the first sample are kept (same length for all samples, so they
    are identical); caches are dropped.
    """
    first_block = mapping.block_list(model)[0][1]
    for path in mapping.pre_blocks:
        model.get_submodule(path).to(device)
    captured: list[torch.Tensor] = []
    filled = [0]
    kwargs_holder: dict[str, Any] = {}
    items = list(batches) if isinstance(batches, list) else [batches[i : i + 1] for i in range(batches.shape[0])]
    direct = None if isinstance(batches, list) else store  # one sample per item: write into the stream

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if direct is not None:
            if not captured:
                captured.append(direct.empty((len(items), *hidden.shape[1:])))
            captured[0][filled[0] : filled[0] + hidden.shape[0]] = hidden.detach().to("cpu")
            filled[0] += hidden.shape[0]
            direct.release(captured[0])
        else:
            captured.append(hidden.detach().to("cpu"))
        if not kwargs_holder:
            kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            kept.update(named_positional(_module, args[1:]))
            kwargs_holder.update(to_device(kept, torch.device("cpu")))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
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
    if direct is not None:
        return captured[0], kwargs_holder
    hidden = torch.cat(captured, dim=0)
    return (store.like(hidden) if store is not None else hidden), kwargs_holder


_DROPPED_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")


def named_positional(block: nn.Module, args: tuple) -> dict[str, Any]:
    """Positional arguments after the hidden states, by the names of ``block.forward``'s parameters (CLIP's
    encoder passes its attention mask positionally), so that captured calls replay as keyword arguments."""
    import inspect

    names = list(inspect.signature(block.forward).parameters)[1:]
    return dict(zip(names, args, strict=False))


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
        digests = list(state.get("block_sha256", []))[:index] + [sha256_file(path)]
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


class BlockSource(Protocol):
    """Where a model's tensors come from when they are not all in memory (:mod:`lrquant.streaming`)."""

    def load(self, model: nn.Module, prefixes: Sequence[str]) -> None:
        """Materialise the tensors under ``prefixes`` (dotted module names of ``model``) on the CPU."""

    def done(self, model: nn.Module, index: int, name: str, block: nn.Module) -> None:
        """Block ``index`` (``name``) is finished and quantized: write it out and drop its tensors."""

    def drop(self, model: nn.Module, prefixes: Sequence[str]) -> None:
        """The tensors under ``prefixes`` are no longer needed."""


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
    store: StreamStore | None = None,
    source: BlockSource | None = None,
) -> EngineResult:
    """Quantize ``model`` in place, block by block, with ``method`` (see module docstring).

    ``calib``: ``[N, L]`` token ids or a list of model-input dicts. ``store``: where the streams live
    (default: fp32 in RAM). ``source``: materialises blocks on demand (a model loaded as a skeleton).
    Returns the per-block reports.
    """
    device = torch.device(device)
    t0 = time.time()
    store = store if store is not None else StreamStore()
    mapping = get_mapping(model)
    slots = mapping.block_list(model)
    blocks = [block for _, block in slots]
    transitions = mapping.transitions(model)
    n_samples = calib.shape[0] if isinstance(calib, torch.Tensor) else len(calib)
    ddp.check_split(n_samples, recipe.train.batch_size)
    if source is not None:
        source.load(model, mapping.pre_blocks)
    method.prepare_model(model, mapping, calib)
    fp_in, kwargs = capture_block_inputs(model, mapping, calib, device, store=store)
    if source is not None:
        source.drop(model, mapping.pre_blocks)
    item = torch.empty((), dtype=store.dtype).element_size()
    on_device = device.type != "cpu" and fp_in.numel() * item * 3 <= STREAM_DEVICE_LIMIT_BYTES
    if on_device:
        fp_in = _swap(store, fp_in, fp_in.to(device))
    q_in = store.like(fp_in)
    # a method that needs no full-precision targets or statistics (RTN, GPTQ) runs the quantized stream only
    keep_fp = method.needs_fp_stream
    if not keep_fp:
        store.free(fp_in)
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

    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=not progress or not ddp.is_main(),
               dynamic_ncols=True)
    for index, (name, block) in enumerate(slots):
        args, kwargs = calls[name]
        if source is not None:
            source.load(model, [name])
        block.to(device)
        fp_out = forward_stream(block, fp_in, kwargs, device, store, args=args) if keep_fp else None
        ctx = BlockContext(
            index=index, name=name, block=block, mapping=mapping, config=model.config,
            recipe=recipe, fp_in=fp_in, q_in=q_in, fp_out=fp_out, kwargs=kwargs, device=device,
            generator=torch.Generator().manual_seed(block_seed(recipe.train.seed, index)),
            report=BlockReport(block=index),
            on_progress=lambda msg, i=index: bar.set_postfix_str(f"block {i}: {msg}", refresh=True),
            block_list=blocks, args=args, store=store,
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
        store.release(fp_in, q_in, fp_out)
        q_out = forward_stream(block, q_in, kwargs, device, store, args=args)
        if index > completed:
            if fp_out is not None:
                ctx.report.out_rel_err = relative_error(q_out, fp_out, store)
            reports.append(ctx.report)
            if ckpt is not None and ddp.is_main():
                ckpt.save(index, block, reports)
            loss = ctx.report.final_loss if ctx.report.final_loss is not None else ctx.report.out_rel_err
            if loss is not None:
                bar.set_postfix_str(f"block {index}: loss {loss:.3g}", refresh=False)
        store.free(fp_in)
        store.free(q_in)
        fp_in, q_in = fp_out, q_out
        block.to("cpu")
        if source is not None:
            source.done(model, index, name, block)
        if index in transitions:  # between stages: the same full-precision module on both streams
            streams = (fp_in, q_in) if keep_fp else (q_in,)
            outs = run_transition(model, transitions[index], calls, streams, device, store)
            for old in streams:
                store.free(old)
            fp_in, q_in = outs if keep_fp else (None, outs[0])
        bar.update(1)
    bar.close()
    store.free(fp_in)
    store.free(q_in)
    method.finalize_model(model, mapping)
    return EngineResult(reports=reports, seconds=time.time() - t0, mapping=mapping)


def _swap(store: StreamStore, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` replaces the stream ``old`` (freed in ``store``)."""
    store.free(old)
    return new


@torch.no_grad()
def relative_error(q: torch.Tensor, ref: torch.Tensor, store: StreamStore | None = None) -> float:
    """``||q - ref||^2 / ||ref||^2`` over streams ``[N, ...]``, one sample at a time (no full temporaries)."""
    num = den = 0.0
    for i in range(ref.shape[0]):
        r = ref[i].double()
        num += float((q[i].double() - r).pow(2).sum())
        den += float(r.pow(2).sum())
        if store is not None:
            store.release(q, ref)
    return num / max(den, 1e-20)


@torch.no_grad()
def run_transition(
    model: nn.Module, name: str, calls: dict[str, tuple[tuple, dict[str, Any]]],
    streams: tuple[torch.Tensor, ...], device: torch.device, store: StreamStore | None = None,
) -> tuple[torch.Tensor, ...]:
    """Apply the stage transition ``name`` (kept in full precision) to each stream ``[N, L, C]`` ->
    ``[N, L', C']`` with its captured call arguments; outputs stay where the inputs were."""
    module = model.get_submodule(name).to(device)
    args, kwargs = calls[name]
    try:
        return tuple(run_stream(module, s, kwargs, device, args=args, store=store) for s in streams)
    finally:
        module.to("cpu")


def layer_errors(model: nn.Module) -> dict[str, float]:
    """Relative weight quantization error ``||W_q - W|| / ||W||`` per frozen linear (recorded at freeze)."""
    return {n: float(m.quant_error) for n, m in quant_linears(model).items() if m.quant_error is not None}
