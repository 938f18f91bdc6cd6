"""Architecture mappings checked against tiny random transformers models of every registered family.

Lookup: ``get_mapping`` (and ``prepare_model``, a no-op for these families) changes nothing in the model.
Structure: every mapped path resolves to a module of the right kind and width, and every Linear / norm
of a block is mapped. Numerics: forward hooks show each mapped norm really feeds the mapped linears,
and every ``SmoothPair`` really folds: scaling its channels by ``s`` on ``prev`` and ``1/s`` on
``nexts`` leaves the logits unchanged (with negative controls showing the check can fail).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers
from helpers import CASES, HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, VOCAB, Case, randomize
from torch import nn

from lrquant.arch import SmoothPair, get_mapping, prepare_model, supported
from lrquant.arch.base import ArchMapping
from lrquant.arch.families import OPT, check_config
from lrquant.arch.vision import DINOV2
from lrquant.errors import UnsupportedArchitectureError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case_model(request) -> tuple[Case, nn.Module]:
    torch.manual_seed(0)
    case: Case = request.param
    return case, randomize(case.build(), seed=1)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    """[2, 8] token ids (0 avoided: it is a padding index in some configs)."""
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


def _cfg(model: nn.Module):
    """The text config (Gemma3ForConditionalGeneration nests head counts in ``text_config``)."""
    return model.config.get_text_config()


def _block(model: nn.Module, mapping: ArchMapping, i: int = 0) -> nn.Module:
    return model.get_submodule(mapping.blocks)[i]


@contextmanager
def _restored(module: nn.Module) -> Iterator[nn.Module]:
    """Yield ``module``; put its parameters back afterwards (folds edit the shared fixture in place)."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        yield module
    finally:
        module.load_state_dict(saved)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- registry ------------------------------------------------------------------------------------


FAMILY_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                  "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "OPTForCausalLM",
                  "LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "Gemma3TextModel", "Gemma3Model",
                  "OPTModel")


def test_family_classes_registered_and_real():
    names = supported()
    for name in FAMILY_CLASSES:
        assert name in names
        assert isinstance(getattr(transformers, name), type), name  # exact transformers class name


def test_unsupported_model_names_supported_classes():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_mapping(model)
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg
    for name in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM"):
        assert name in msg


def test_prepare_model_passes_unregistered_models_through():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert prepare_model(model) is model  # get_mapping is the one that refuses it


def test_typed_optional_fields():
    """What a family declares beyond paths is typed: DINOv2 evaluates at 224; the text families need no
    preparation, no checkpoint layout of their own and no evaluation size."""
    assert DINOV2.eval_image_size == 224 and DINOV2.preparation is None and DINOV2.checkpoint_layout is None
    assert OPT.eval_image_size is None and OPT.preparation is None and OPT.checkpoint_layout is None


def test_get_mapping_leaves_the_model_untouched(case_model):
    _, model = case_model
    modules = [(n, type(m)) for n, m in model.named_modules()]
    params = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    attrs, config = sorted(vars(model)), model.config.to_dict()
    mapping = get_mapping(model)
    assert mapping.preparation is None and prepare_model(model) is model
    assert get_mapping(model) == mapping
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [(n, p) for n, p in model.named_parameters()] == [(n, p) for n, p, _ in params]
    assert all(torch.equal(p, ref) for (_, p), (_, _, ref) in zip(model.named_parameters(), params, strict=True))
    assert sorted(vars(model)) == attrs and model.config.to_dict() == config


# ---- structure -----------------------------------------------------------------------------------


def test_family_and_base_model(case_model):
    case, model = case_model
    mapping = get_mapping(model)
    assert mapping.family == case.family
    base = getattr(model, case.base_attr)
    base_mapping = get_mapping(base)
    assert base_mapping.family == case.family
    assert base_mapping.head is None
    assert base_mapping == mapping.for_base_model()
    # the same modules, reached from either root
    assert base.get_submodule(base_mapping.blocks) is model.get_submodule(mapping.blocks)
    assert base.get_submodule(base_mapping.final_norm) is model.get_submodule(mapping.final_norm)
    assert base.get_submodule(base_mapping.embed_tokens) is model.get_submodule(mapping.embed_tokens)
    for p_base, p in zip(base_mapping.pre_blocks, mapping.pre_blocks, strict=True):
        assert base.get_submodule(p_base) is model.get_submodule(p)


def test_pre_blocks_are_what_runs_before_block0(case_model, input_ids):
    """``pre_blocks`` = the outermost modules that run before block 0 (containers of the blocks aside)."""
    _, model = case_model
    mapping = get_mapping(model)
    block0 = f"{mapping.blocks}.0"
    containers = {"", *(block0.rsplit(".", k)[0] for k in range(1, block0.count(".") + 1))}
    called: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: called.append(name))
               for name, m in model.named_modules() if name not in containers]
    try:
        _logits(model, input_ids)
    finally:
        for h in handles:
            h.remove()
    before = called[:called.index(block0)]
    outermost = {n for n in before if not any(n.startswith(f"{o}.") for o in before)}
    image_parts = {mapping.parts.vision_tower, mapping.parts.projector} if mapping.parts else set()
    assert outermost == set(mapping.pre_blocks) - image_parts  # on text input the image parts do not run


def test_model_level_paths(case_model):
    _, model = case_model
    mapping = get_mapping(model)
    blocks = model.get_submodule(mapping.blocks)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == LAYERS
    for path in mapping.pre_blocks:
        assert isinstance(model.get_submodule(path), nn.Module), path
    embed = model.get_submodule(mapping.embed_tokens)
    assert isinstance(embed, nn.Embedding) and embed.weight.shape == (VOCAB, HIDDEN)
    assert embed is model.get_input_embeddings()
    head = model.get_submodule(mapping.head)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (HIDDEN, VOCAB)
    assert head is model.get_output_embeddings()
    assert model.get_submodule(mapping.final_norm).weight.shape == (HIDDEN,)


def test_block_linears_shapes_and_coverage(case_model):
    _, model = case_model
    mapping = get_mapping(model)
    n, kv, hd = mapping.heads(_cfg(model))
    assert (n, kv) == (HEADS, KV_HEADS if mapping.n_kv_heads_attr else HEADS)
    expected = {
        mapping.q: (HIDDEN, n * hd), mapping.k: (HIDDEN, kv * hd), mapping.v: (HIDDEN, kv * hd),
        mapping.o: (n * hd, HIDDEN), mapping.mlp_out: (INTER, HIDDEN),
        **{p: (HIDDEN, INTER) for p in mapping.mlp_in},
    }
    assert len(mapping.linears()) == len(set(mapping.linears())) == len(expected)
    for block in model.get_submodule(mapping.blocks):
        for path in mapping.linears():
            lin = block.get_submodule(path)
            assert isinstance(lin, nn.Linear), path
            assert (lin.in_features, lin.out_features) == expected[path], path
        attn = block.get_submodule(mapping.attention)
        for path in (mapping.q, mapping.k, mapping.v, mapping.o):
            assert path.startswith(f"{mapping.attention}.") and attn.get_submodule(path.rpartition(".")[2])
        # nothing quantizable in a block is left unmapped
        found = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert found == set(mapping.linears())


def test_block_norm_paths_and_coverage(case_model):
    _, model = case_model
    mapping = get_mapping(model)
    _, _, hd = mapping.heads(_cfg(model))
    norms = {mapping.attn_norm: HIDDEN, mapping.mlp_norm: HIDDEN, mapping.q_norm: hd, mapping.k_norm: hd,
             mapping.post_attn_norm: HIDDEN, mapping.post_mlp_norm: HIDDEN}
    norms.pop(None, None)
    block = _block(model, mapping)
    for path, width in norms.items():
        norm = block.get_submodule(path)
        assert norm.weight.shape == (width,), path
        assert (getattr(norm, "bias", None) is not None) == (mapping.norm_kind == "layer"), path
    # every non-Linear module owning parameters is a mapped norm
    owners = {name for name, m in block.named_modules()
              if not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))}
    assert owners == set(norms)


def test_smooth_pair_widths_and_head_arithmetic(case_model):
    case, model = case_model
    mapping = get_mapping(model)
    n, kv, hd = mapping.heads(_cfg(model))
    block = _block(model, mapping)
    assert tuple(p.kind for p in mapping.smooth_pairs()) == case.pair_kinds
    assert mapping.rope == case.rope
    for pair in mapping.smooth_pairs():
        prev = block.get_submodule(pair.prev)
        nexts = [block.get_submodule(p) for p in pair.nexts]
        if pair.kind in ("norm", "linear"):
            width = prev.weight.shape[0] if pair.kind == "norm" else prev.out_features
            assert all(nx.in_features == width for nx in nexts), pair
        elif pair.kind == "heads":
            (o,) = nexts
            assert prev.out_features == kv * hd and o.in_features == n * hd
            assert n % kv == 0 and o.in_features == prev.out_features * (n // kv)
        else:
            assert pair.kind == "qk"
            (k,) = nexts
            assert prev.out_features == n * hd and k.out_features == kv * hd
            assert n % kv == 0 and prev.out_features == k.out_features * (n // kv)


# ---- numerics: norms feed linears, sandwich/QK norms sit where mapped ------------------------------


def test_norms_feed_mapped_linears(case_model, input_ids):
    _, model = case_model
    mapping = get_mapping(model)
    _, _, hd = mapping.heads(_cfg(model))
    block = _block(model, mapping)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_m, args, out):
            inputs[name] = args[0].detach()
            outputs[name] = (out[0] if isinstance(out, tuple) else out).detach()
        return fn

    paths = {*mapping.linears(), mapping.attn_norm, mapping.mlp_norm, mapping.q_norm, mapping.k_norm,
             mapping.post_attn_norm, mapping.post_mlp_norm} - {None}
    handles = [block.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    try:
        _logits(model, input_ids)
    finally:
        for h in handles:
            h.remove()

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.numel() == b.numel() and torch.equal(a.reshape(-1), b.reshape(-1))

    for lin in (mapping.q, mapping.k, mapping.v):
        assert same(outputs[mapping.attn_norm], inputs[lin]), lin
    for lin in mapping.mlp_in:
        assert same(outputs[mapping.mlp_norm], inputs[lin]), lin
    assert not same(outputs[mapping.attn_norm], inputs[mapping.mlp_in[0]])
    if mapping.q_norm:
        assert inputs[mapping.q_norm].shape[-1] == hd
        for lin, norm in ((mapping.q, mapping.q_norm), (mapping.k, mapping.k_norm)):
            heads_in = outputs[lin].view(*input_ids.shape, -1, hd)  # [batch, seq, heads, hd]
            got = inputs[norm]  # per-head norm input, before or after moving heads ahead of seq
            assert same(heads_in, got) or same(heads_in.transpose(1, 2), got), norm
    if mapping.post_attn_norm:
        assert same(outputs[mapping.o], inputs[mapping.post_attn_norm])
    if mapping.post_mlp_norm:
        assert same(outputs[mapping.mlp_out], inputs[mapping.post_mlp_norm])


# ---- numerics: every smooth pair folds exactly ---------------------------------------------------


def _expand_kv(s: torch.Tensor, n: int, kv: int, hd: int) -> torch.Tensor:
    """[kv*hd] per-kv-head-channel values -> [n*hd] for the query heads sharing each kv head."""
    return s.view(kv, 1, hd).expand(kv, n // kv, hd).reshape(n * hd)


def _scale_rows(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.mul_(s[:, None])
    if lin.bias is not None:
        lin.bias.mul_(s)


def _fold(model: nn.Module, mapping: ArchMapping, pair: SmoothPair, s: torch.Tensor, wrong_gqa: bool = False):
    """Scale ``pair``'s channels by ``s`` on ``prev`` and by ``1/s`` on ``nexts`` in block 0."""
    block = _block(model, mapping)
    n, kv, hd = mapping.heads(_cfg(model))
    prev = block.get_submodule(pair.prev)
    nexts = [block.get_submodule(p) for p in pair.nexts]
    with torch.no_grad():
        if pair.kind == "norm":
            if mapping.norm_kind == "rms_plus_one":
                prev.weight.copy_((1 + prev.weight) * s - 1)
            else:
                prev.weight.mul_(s)
                if mapping.norm_kind == "layer":
                    prev.bias.mul_(s)
            for nx in nexts:
                nx.weight.div_(s[None, :])
        elif pair.kind == "linear":
            _scale_rows(prev, s)
            nexts[0].weight.div_(s[None, :])
        elif pair.kind == "heads":
            _scale_rows(prev, s)
            s_o = s.repeat(n // kv) if wrong_gqa else _expand_kv(s, n, kv, hd)
            nexts[0].weight.div_(s_o[None, :])
        else:  # qk: q rows * s, k rows / s, s shared by each GQA group
            _scale_rows(prev, _expand_kv(s, n, kv, hd))
            _scale_rows(nexts[0], 1 / s)


def _pair_scale(mapping: ArchMapping, model: nn.Module, pair: SmoothPair, gen: torch.Generator) -> torch.Tensor:
    """Positive per-channel scales in [0.5, 2]; for q/k under RoPE equal on each rotated (d, d+hd/2) pair."""
    block = _block(model, mapping)
    prev = block.get_submodule(pair.prev)
    width = prev.weight.shape[0]
    if pair.kind == "qk":
        n, kv, hd = mapping.heads(_cfg(model))
        width = kv * hd
        if mapping.rope:
            half = 2 ** (torch.rand(kv, hd // 2, generator=gen) * 2 - 1)
            return torch.cat([half, half], dim=1).reshape(-1)
    return 2 ** (torch.rand(width, generator=gen) * 2 - 1)


def test_smooth_pairs_fold_exactly(case_model, input_ids):
    _, model = case_model
    mapping = get_mapping(model)
    ref = _logits(model, input_ids)
    gen = torch.Generator().manual_seed(3)
    for pair in mapping.smooth_pairs():
        with _restored(_block(model, mapping)):
            _fold(model, mapping, pair, _pair_scale(mapping, model, pair, gen))
            out = _logits(model, input_ids)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=str(pair))


def test_fold_check_can_fail(case_model, input_ids):
    """Negative controls: a wrong GQA expansion, RoPE-blind q/k scales and folding the wrong norm all
    change the logits."""
    _, model = case_model
    mapping = get_mapping(model)
    ref = _logits(model, input_ids)
    gen = torch.Generator().manual_seed(4)
    n, kv, _ = mapping.heads(_cfg(model))
    if n != kv:
        (heads,) = [p for p in mapping.smooth_pairs() if p.kind == "heads"]
        with _restored(_block(model, mapping)):
            _fold(model, mapping, heads, _pair_scale(mapping, model, heads, gen), wrong_gqa=True)
            assert (_logits(model, input_ids) - ref).abs().max() > 1e-3 * ref.abs().max()
    if mapping.rope and "qk" in [p.kind for p in mapping.smooth_pairs()]:
        # q/k scales that differ inside a rotated (d, d + hd/2) pair do not commute with RoPE
        (qk,) = [p for p in mapping.smooth_pairs() if p.kind == "qk"]
        with _restored(_block(model, mapping)):
            _fold(model, mapping, qk, 2 ** (torch.rand(kv * mapping.heads(_cfg(model))[2], generator=gen) * 2 - 1))
            assert (_logits(model, input_ids) - ref).abs().max() > 1e-3 * ref.abs().max()
    # pretend the MLP is fed by the other residual-width norm of the block
    decoy = mapping.post_attn_norm or mapping.attn_norm
    wrong = SmoothPair(decoy, mapping.mlp_in, "norm")
    with _restored(_block(model, mapping)):
        _fold(model, mapping, wrong, _pair_scale(mapping, model, wrong, gen))
        assert (_logits(model, input_ids) - ref).abs().max() > 1e-3 * ref.abs().max()
    torch.testing.assert_close(_logits(model, input_ids), ref, rtol=0, atol=0)  # fixture restored


# ---- config checks -------------------------------------------------------------------------------


def test_check_config_accepts_tiny_models(case_model):
    _, model = case_model
    check_config(get_mapping(model), _cfg(model))


@pytest.mark.parametrize("override, words", [
    (dict(activation_function="gelu"), "ReLU"),
    (dict(do_layer_norm_before=False), "post-LayerNorm"),
    (dict(word_embed_proj_dim=32), "project_in"),
])
def test_opt_config_check_refuses_other_layouts(override, words):
    config = transformers.OPTConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, **override)
    with pytest.raises(UnsupportedArchitectureError, match=words):
        check_config(OPT, config)
