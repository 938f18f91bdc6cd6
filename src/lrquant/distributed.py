"""Data parallel over ``torch.distributed``: the few collective steps the block loop needs.

Launched by ``torchrun --nproc-per-node N -m lrquant quantize ...`` (gloo on CPU, NCCL on CUDA; each rank
uses ``cuda:LOCAL_RANK``), or through the Python API when the caller already created a process group.
Without a process group every helper is the identity, so the one-process path is unchanged.

What is split and what is shared: every rank holds the whole calibration streams ``[N, L, H]``; each
training batch of ``train.batch_size`` samples (the *global* batch) is split across the ranks and the
gradients are averaged, so one step sees the same samples as one process does; stream forwards are
computed on ``N / world`` samples per rank and gathered; statistics (activation ranges, Hessians, losses)
are reduced. Only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import ConfigError


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (``gloo`` for a CPU ``device``, ``nccl`` for CUDA) and
    return the device this rank computes on (``cuda:LOCAL_RANK`` for CUDA). A no-op returning ``device``
    outside torchrun or when a group already exists."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # a rank waits for rank 0 while it evaluates the FP model: allow long waits
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return device


def check_split(nsamples: int, batch_size: int) -> None:
    """Refuse a calibration set or global batch that the ranks cannot split evenly (an uneven split would
    weigh samples differently from the one-process run)."""
    w = world()
    if w > 1 and (nsamples % w or batch_size % w):
        raise ConfigError(f"{w} processes need nsamples ({nsamples}) and the global --batch-size ({batch_size}) "
                          f"to be multiples of {w}")


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (``sum``, ``min``, ``max`` or ``mean``) and return it."""
    if not active():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dev = _collective_device()
    buf = tensor if tensor.device == dev else tensor.to(dev)
    dist.all_reduce(buf, ops[op])
    if op == "mean":
        buf /= dist.get_world_size()
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def mean_scalar(value: float) -> float:
    """The mean of ``value`` over ranks (float64 on CPU, so gloo and NCCL agree on it)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    return float(all_reduce_(t, "mean").item())


def sum_scalars(*values: float) -> tuple[float, ...]:
    """Each value summed over ranks."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    return tuple(float(v) for v in all_reduce_(t, "sum").tolist())


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` samples (``n`` a multiple of the world size)."""
    w, r = world(), rank()
    size = n // w
    return slice(r * size, (r + 1) * size)


def gather_into(out: torch.Tensor, part: torch.Tensor) -> None:
    """Every rank's ``part [n / world, ...]`` (rank order) into ``out [n, ...]`` on every rank."""
    if not active():
        out.copy_(part)
        return
    dev = _collective_device()
    parts = [torch.empty_like(part, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, part.to(dev).contiguous())
    size = part.shape[0]
    for i, p in enumerate(parts):
        out[i * size : (i + 1) * size] = p.to(out.device)


def _collective_device() -> torch.device:
    """Where tensors must live for the backend: CUDA for NCCL, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
