"""Export frozen fake-quant models as GGUF files for llama.cpp, writing lrquant's own grids.

llama.cpp's legacy block formats hold 32 weights of one row per block, with an fp16 scale ``d`` (and an
fp16 minimum ``m``) per block. Five of them are uniform grids that lrquant's weight quantizers produce
exactly, so the learned clipping and rounding carry over: the integer codes in the file are lrquant's
codes, bit for bit.

============  ==========================  =============================================
GGUF type     lrquant weights             dequantized weight (u: unsigned code in block)
============  ==========================  =============================================
``Q4_0``      4-bit symmetric             ``d * (u - 8)``,  ``u = q + 8``
``Q4_1``      4-bit asymmetric            ``d * u + m``,    ``u = q``, ``m = -zp * scale``
``Q5_0``      5-bit symmetric             ``d * (u - 16)``, ``u = q + 16``
``Q5_1``      5-bit asymmetric            ``d * u + m``,    ``u = q``, ``m = -zp * scale``
``Q8_0``      8-bit symmetric             ``d * q``
============  ==========================  =============================================

Weight-only schemes only, with groups of 32 or a multiple of 32 (a group of 64 is two blocks sharing
their scale and minimum), or per channel / per tensor when the input dimension is a multiple of 32.
Everything else (2/3/6/7-bit or asymmetric 8-bit weights, other group sizes, activation quantization) has
no exact GGUF type and is refused with the list above (:func:`gguf_quant_type`).

fp16: the file stores ``d = fp16(scale)`` and ``m = fp16(-zp * scale)``, as llama.cpp does, so a GGUF
weight differs from the in-memory fake-quant weight ``(q - zp) * scale`` by at most
``2^-11 * (|q - c| * scale + |zp| * scale)`` (fp16's unit roundoff; ``c`` the type's code offset), plus
``2^-25`` per term where ``d`` or ``m`` falls below fp16's normal range: a small fraction of one
quantization step (see :func:`block_params` and the tests). The codes themselves are exact.

Tensor names and metadata follow llama.cpp's converter (``convert_hf_to_gguf.py``) for the Llama family
(``LlamaForCausalLM``: architecture ``llama``, q/k rows permuted to llama.cpp's interleaved rotary layout)
and Qwen2 (``Qwen2ForCausalLM``: architecture ``qwen2``, biases kept, no permutation); names come from the
``gguf`` package's own tensor map. Dense tensors: norms and biases in float32 (as llama.cpp keeps them),
embeddings and unquantized linears (``lm_head``) in ``dtype``. A byte-level BPE tokenizer is written as
llama.cpp's ``gpt2`` vocabulary (tokens, types, merges, special ids, chat template; the pre-tokenizer
named ``gpt-2`` when it is GPT-2's byte-level regex, else as the caller names it, else llama.cpp's default).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import QuantArgs, Scheme
from ..errors import ConfigError
from ..quant.quantizers import QuantLinear
from .compressed import ExportError, check_exportable, recover_codes

BLOCK = 32  # weights per llama.cpp block (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = 32)
FP16_UNIT_ROUNDOFF = 2.0**-11
FP16_SUBNORMAL_HALF_STEP = 2.0**-25


@dataclass(frozen=True)
class GGUFType:
    """One exact match between a weight grid and a llama.cpp block format."""

    name: str          # gguf.GGMLQuantizationType member
    file_type: str     # gguf.LlamaFileType member (general.file_type)
    bits: int
    symmetric: bool
    offset: int        # u = q + offset is the unsigned code stored in the block


EXACT_TYPES = (
    GGUFType("Q4_0", "MOSTLY_Q4_0", 4, True, 8),
    GGUFType("Q4_1", "MOSTLY_Q4_1", 4, False, 0),
    GGUFType("Q5_0", "MOSTLY_Q5_0", 5, True, 16),
    GGUFType("Q5_1", "MOSTLY_Q5_1", 5, False, 0),
    GGUFType("Q8_0", "MOSTLY_Q8_0", 8, True, 0),
)

# transformers class -> (GGUF architecture, permute q/k rows for llama.cpp's rotary layout)
ARCHS = {"LlamaForCausalLM": ("llama", True), "Qwen2ForCausalLM": ("qwen2", False)}


def exact_matches() -> str:
    """The exact weight grids GGUF holds, for messages."""
    return ", ".join(f"{t.name} = {t.bits}-bit {'symmetric' if t.symmetric else 'asymmetric'}" for t in EXACT_TYPES)


def gguf_quant_type(scheme: Scheme) -> GGUFType:
    """The GGUF block type that holds ``scheme``'s weight grid exactly; :class:`ExportError` (one line) when
    none does. Per-tensor checks (the input dimension a multiple of 32) happen at export."""
    w = scheme.weights
    why = None
    if w is None:
        why = "it quantizes no weights"
    elif scheme.input_activations is not None:
        why = "GGUF stores weights only (llama.cpp quantizes activations its own way)"
    elif w.strategy == "group" and (w.group_size or 0) % BLOCK != 0:
        why = f"group size {w.group_size} is not a multiple of {BLOCK}"
    elif w.strategy not in ("group", "channel", "tensor"):
        why = f"strategy {w.strategy} has no block layout"
    if why is None:
        for t in EXACT_TYPES:
            if (t.bits, t.symmetric) == (w.num_bits, w.symmetric):
                return t
        why = f"{w.num_bits}-bit {'symmetric' if w.symmetric else 'asymmetric'} weights have no exact block type"
    raise ExportError(f"scheme {scheme.name()} cannot be written to GGUF exactly ({why}); exact matches, "
                      f"weight-only in groups of a multiple of {BLOCK} or per channel: {exact_matches()}")


# ---- blocks --------------------------------------------------------------------------------------------
def _per_block(t: torch.Tensor, args: QuantArgs, shape: torch.Size) -> torch.Tensor:
    """Per-row qparams ``[rows, 1]`` (``as_rows`` view) -> one value per 32-block ``[out, in / 32]``."""
    out, cols = shape
    blocks = cols // BLOCK
    if args.strategy == "group":
        return t.reshape(out, cols // args.group_size).repeat_interleave(args.group_size // BLOCK, dim=1)
    return t.reshape(-1, 1).expand(out, blocks) if args.strategy == "channel" else t.reshape(1, 1).expand(out, blocks)


def block_params(m: QuantLinear, qtype: GGUFType, name: str = "linear"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Block codes ``u [out, in]`` (int32), ``d [out, in / 32]`` and, for asymmetric types,
    ``m [out, in / 32]`` (float16) of one frozen QuantLinear: ``u = q + offset`` with lrquant's exact codes
    ``q`` (unsigned for the 4/5-bit types, signed for Q8_0), ``d = fp16(scale)``, ``m = fp16(-zp * scale)``."""
    args = m.weight_quantizer.args
    shape = m.weight.shape
    if shape[1] % BLOCK:
        raise ExportError(f"{name}: input dimension {shape[1]} is not a multiple of the GGUF block size {BLOCK}")
    scale, zp = m.weight_quantizer.scale.detach().float(), m.weight_quantizer.zero_point.detach().float()
    codes = recover_codes(m.weight, scale, zp, args, name)
    scale_b = _per_block(scale, args, shape)
    if scale_b.abs().max() > torch.finfo(torch.float16).max:
        raise ExportError(f"{name}: a scale exceeds the float16 range of GGUF block scales")
    d = scale_b.to(torch.float16)
    mins = None if qtype.symmetric else (-_per_block(zp, args, shape) * scale_b).to(torch.float16)
    return codes + qtype.offset, d, mins


def pack_blocks(u: torch.Tensor, d: torch.Tensor, mins: torch.Tensor | None, qtype: GGUFType) -> np.ndarray:
    """llama.cpp block bytes ``[out, in / 32 * block_bytes]`` (uint8) from codes ``u [out, in]``, ``d`` and
    ``mins [out, in / 32]``. Per block: ``d`` (fp16), ``m`` (fp16, Q4_1/Q5_1), for 5 bits the 32 high bits
    (``qh``, little-endian bit order), then 16 bytes of nibbles (byte ``j`` holds codes ``j`` and ``j + 16``)
    or, for Q8_0, 32 signed bytes."""
    out, cols = u.shape
    nb = cols // BLOCK
    ub = u.reshape(out * nb, BLOCK).numpy()
    parts = [d.reshape(-1, 1).numpy().view(np.uint8)]
    if mins is not None:
        parts.append(mins.reshape(-1, 1).numpy().view(np.uint8))
    if qtype.bits == 8:
        parts.append(ub.astype(np.int8).view(np.uint8))  # signed bytes
    else:
        ub = ub.astype(np.uint8)
        if qtype.bits == 5:
            parts.append(np.packbits((ub >> 4) & 1, axis=-1, bitorder="little"))
        low = ub & 0x0F
        parts.append(low[:, : BLOCK // 2] | (low[:, BLOCK // 2:] << 4))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def _permute_rotary(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (``[heads * head_dim, ...]``) from transformers' half-split rotary layout
    to llama.cpp's interleaved one: within each head, row ``i`` of the first half and row ``i`` of the
    second half become neighbours."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


# ---- metadata ------------------------------------------------------------------------------------------
def _write_hparams(writer, config, qtype: GGUFType) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(str(getattr(config, "name_or_path", "") or config.model_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope.get('rope_type')!r} is not written to GGUF here")
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, qtype.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def infer_pre_tokenizer(state: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a ``tokenizers`` pre-tokenizer it reproduces (``state``: the
    tokenizer's JSON): GPT-2's byte-level regex alone is ``"gpt-2"``; None for anything else."""
    pre = state.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def _write_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary (ids past the tokenizer padded as
    unused ``[PAD<i>]`` tokens, as the converter does). ``pre``: llama.cpp's pre-tokenizer name; None infers
    it (:func:`infer_pre_tokenizer`), falling back to ``"default"`` with a warning."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    if state.get("model", {}).get("type") != "BPE":
        raise ExportError("GGUF export writes byte-level BPE tokenizers only; pass tokenizer=None to leave it out")
    if pre is None:
        pre = infer_pre_tokenizer(state)
        if pre is None:
            warnings.warn("GGUF export: pre-tokenizer not recognized; llama.cpp will split text its default way "
                          "(name it with tokenizer_pre=...)", stacklevel=3)
            pre = "default"
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for tok, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for added in state.get("added_tokens", []):
        if added["id"] < vocab_size:
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ---- export --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    """A temporary sibling of ``target`` to write; renamed over ``target`` on success, removed on error."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_gguf(model: nn.Module, scheme: Scheme, out_path: str | Path, tokenizer=None,
                dtype: torch.dtype | None = None, online_ops: list[str] | tuple[str, ...] = (),
                tokenizer_pre: str | None = None) -> Path:
    """Write ``model`` (frozen QuantLinears following ``scheme``) as one GGUF file at ``out_path``.

    ``model``: a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` whose decoder linears are frozen
    :class:`QuantLinear`\\ s; their weights are stored in the block type :func:`gguf_quant_type` picks,
    everything else dense (``dtype``: float16, or None for the model's float32; norms and biases always
    float32). ``tokenizer``: written as llama.cpp's ``gpt2`` vocabulary when given, with ``tokenizer_pre``
    naming llama.cpp's pre-tokenizer (None: inferred where llama.cpp has an exact equivalent). Refuses
    (:class:`ExportError`, one line) grids without an exact GGUF type, other architectures, unfolded
    transforms and online ops. The file is written to a temporary sibling and renamed into place. Returns
    ``out_path``.
    """
    import gguf

    qtype = gguf_quant_type(scheme)
    arch_name = type(model).__name__
    if arch_name not in ARCHS:
        raise ExportError(f"GGUF export supports {', '.join(ARCHS)}; got {arch_name}")
    if dtype not in (None, torch.float16, torch.float32):
        raise ConfigError(f"GGUF dense tensors are float16 or float32, not {dtype}")
    if scheme.kv_cache is not None:
        warnings.warn(f"scheme {scheme.name()}: KV-cache quantization is not written to GGUF (llama.cpp picks its "
                      "own cache type at run time)", stacklevel=2)
    quant = check_exportable(model, scheme, online_ops)
    arch, permute = ARCHS[arch_name]
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    out = Path(out_path).absolute()
    if out.is_dir():
        raise ExportError(f"GGUF export target {out} is a folder; give a .gguf file path")
    out.parent.mkdir(parents=True, exist_ok=True)

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{hf_name}: no GGUF tensor name for architecture {arch}")
        return name

    def rows_heads(module_name: str) -> int | None:
        if not permute:
            return None
        return heads if module_name.endswith("q_proj") else kv_heads if module_name.endswith("k_proj") else None

    with _atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _write_hparams(writer, config, qtype)
        if tokenizer is not None:
            _write_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
        ggml_type = getattr(gguf.GGMLQuantizationType, qtype.name)
        written: set[int] = set()
        for key, value in model.state_dict(keep_vars=True).items():
            module_name, _, leaf = key.rpartition(".")
            if module_name in quant and leaf == "weight":
                u, d, mins = block_params(quant[module_name], qtype, module_name)
                if (h := rows_heads(module_name)) is not None:
                    u, d = _permute_rotary(u, h), _permute_rotary(d, h)
                    mins = None if mins is None else _permute_rotary(mins, h)
                data = pack_blocks(u, d, mins, qtype)
                writer.add_tensor(gguf_name(key), data, raw_shape=data.shape, raw_dtype=ggml_type)
                continue
            if module_name in quant and leaf != "bias" or value.data_ptr() in written:
                continue  # quantizer state; a tied tensor (lm_head = embeddings) is written once
            written.add(value.data_ptr())
            t = value.detach().float()
            if (h := rows_heads(module_name)) is not None:
                t = _permute_rotary(t, h)
            if t.ndim >= 2 and dtype == torch.float16:
                t = t.half()
            writer.add_tensor(gguf_name(key), t.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
