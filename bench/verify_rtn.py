"""Independent check of lrquant's RTN numbers (issue 2, "done when").

Re-implements, without lrquant's quantizers, engine or perplexity code, the same protocol:
  * WikiText-2 raw test split, rows joined with "\\n\\n", tokenized once, non-overlapping 2048-token windows,
    PPL = exp(mean window NLL);
  * RTN weights: asymmetric min-max per output row (W4A16: groups of 64 input columns), range
    containing 0, integer zero point;
  * W4A4: per-channel asymmetric 4-bit weights and dynamic per-token asymmetric 4-bit activations on the
    input of every decoder linear (q, k, v, o, gate, up, down); no KV-cache quantization.
and prints both implementations' perplexities side by side on the first N windows.

    python bench/verify_rtn.py --data-dir ../shared/data --windows 8
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer


def wikitext_test_text(data_dir: Path) -> str:
    """HF `wikitext-2-raw-v1` test rows (each line with its newline; blank lines as "") joined by \\n\\n."""
    rows = []
    for line in (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(True):
        rows.append("" if not line.strip() else line)
    return "\n\n".join(rows)


def rtn_rows(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    shape = w.shape
    x = w.reshape(-1, group) if group else w
    lo = x.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = x.max(dim=1, keepdim=True).values.clamp(min=0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = (-lo / scale).round().clamp(0, qmax)
    q = ((x / scale).round() + zero).clamp(0, qmax)
    return ((q - zero) * scale).reshape(shape)


class ActQuant(nn.Module):
    def __init__(self, inner: nn.Linear, bits: int) -> None:
        super().__init__()
        self.inner, self.bits = inner, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(rtn_rows(x.reshape(-1, x.shape[-1]), self.bits, None).reshape(x.shape))


def independent(model: nn.Module, wbits: int, abits: int, group: int | None) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        child.weight.copy_(rtn_rows(child.weight, wbits, group))
                        if abits < 16:
                            setattr(parent, name, ActQuant(child, abits))
    return model


@torch.no_grad()
def ppl(model: nn.Module, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    nlls = []
    for i in range(windows):
        batch = ids[:, i * seqlen : (i + 1) * seqlen]
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nlls.append(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))
    return math.exp(torch.stack(nlls).mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()

    from lrquant import api
    from lrquant.config import CalibArgs, Recipe, Scheme
    from lrquant.data.text import eval_tokens
    from lrquant.eval.perplexity import perplexity
    from lrquant.models import resolve_model_path

    path, name = resolve_model_path("default")
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(wikitext_test_text(Path(args.data_dir)), return_tensors="pt").input_ids
    ours_ids = eval_tokens(tok, "wikitext2", data_dir=args.data_dir)
    assert torch.equal(ids, ours_ids), "tokenized evaluation text differs"
    print(f"model {name}; WikiText-2 test: {ids.shape[1]} tokens, first {args.windows} windows x {args.seqlen}")

    rows = [("FP", 16, 16, None)] + [("RTN W4A16g64", 4, 16, 64), ("RTN W4A4", 4, 4, None)]
    print(f"{'setting':<14} {'independent':>12} {'lrquant':>10} {'rel diff':>9} {'seconds':>8}")
    for label, wb, ab, g in rows:
        t0 = time.time()
        ref = ppl(independent(fp, wb, ab, g) if wb < 16 else fp, ids, args.seqlen, args.windows)
        model = copy.deepcopy(fp)
        if wb < 16:
            recipe = Recipe(method="rtn", scheme=Scheme.from_bits(wb, ab, g, kv_bits=16),
                            calib=CalibArgs(nsamples=2, seqlen=128))
            api.quantize(model, recipe, ids[:, :256].reshape(2, 128), progress=False)
        ours = perplexity(model, ours_ids, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl
        print(f"{label:<14} {ref:12.4f} {ours:10.4f} {abs(ours - ref) / ref:9.2%} {time.time() - t0:8.0f}", flush=True)


if __name__ == "__main__":
    main()
