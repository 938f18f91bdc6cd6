"""Run peer PTQ tools (llm-compressor, auto-round) on lrquant's exact calibration tokens and evaluation windows.

Run with the PEERS venv (bench/peers/setup.sh), after dump_protocol.py wrote the protocol file:

    bench/peers/.venv/bin/python bench/peers/run_peers.py \
        --protocol bench/peers/results/protocol-smollm2.safetensors \
        --rows fp,gptq:W4A16g64,gptq:W3A16g64 --output bench/peers/results/peers-smollm2.jsonl

Each row runs in its own subprocess (a fresh llm-compressor session, and a per-row peak RSS) and appends one
JSON line ``{peer, setting, ppl, calib_time_s, peak_rss_gb, versions, ...}`` to ``--output``.

Rows (``PEER:SETTING``; settings ``WxA16gG`` weight-only grouped, ``WxAy`` per-channel weights with dynamic
per-token activations; weights and activations asymmetric int, lm_head and the KV cache left in 16 bits):

* ``fp``                   the unquantized model (sanity check of the perplexity loop)
* ``rtn:W4A16g64``         llm-compressor QuantizationModifier (min-max RTN; checks the fake-quant forward)
* ``gptq:W4A16g64``        llm-compressor GPTQModifier (also W3A16g64, W2A16g64, W4A4, W8A8)
* ``awq:W4A16g64``         llm-compressor AWQModifier + QuantizationModifier
* ``sq-gptq:W8A8``         llm-compressor SmoothQuantModifier (strength 0.8) + GPTQModifier (also W4A4)
* ``spinquant-gptq:W4A4``  llm-compressor SpinQuantModifier (hadamard R1, R2, R4) + GPTQModifier
* ``autoround:W4A16g64``   auto-round AutoRound (``--iters``, default 50), then its fake-quant model

Perplexity is lrquant's ``eval/perplexity.py`` loop, re-implemented here (this venv has no lrquant): every
window [1, 2048] is scored as ``model(window, use_cache=False)`` in fp32, mean float32 cross-entropy of its
2047 next-token predictions (accumulated in float64), ``ppl = exp(mean of window losses)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DEFAULT_ROWS = ("gptq:W4A16g64,gptq:W3A16g64,gptq:W2A16g64,sq-gptq:W8A8,sq-gptq:W4A4,spinquant-gptq:W4A4,"
                "awq:W4A16g64,awq:W3A16g64,autoround:W4A16g64,autoround:W3A16g64,autoround:W2A16g64")
PEERS = ("fp", "rtn", "gptq", "awq", "sq-gptq", "spinquant-gptq", "autoround")
SETTING_RE = re.compile(r"^W(\d)A(\d+)(?:g(\d+))?$")
LOSS_CHUNK_ROWS = 512
SQ_STRENGTH = 0.8
SPIN_ROTATIONS = ("R1", "R2", "R4")
# "hadamard" (Sylvester) needs power-of-two sizes; SmolLM2 has hidden 576 = 36 * 16 and MLP 1536 = 12 * 128,
# which the randomized Hadamard (known Hadamard factors times a random +-1 diagonal) supports.
SPIN_TYPE = "random-hadamard"


def parse_setting(setting: str) -> tuple[int, int, int]:
    """``W4A16g64`` -> (4, 16, 64); ``W4A4`` -> (4, 4, 0) (0 = per channel)."""
    m = SETTING_RE.match(setting)
    if not m:
        raise SystemExit(f"bad setting {setting!r}; expected e.g. W4A16g64 or W8A8")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "n/a"
    return out


def tensor_sha256(t) -> str:
    import torch

    return hashlib.sha256(t.contiguous().to(torch.int64).numpy().tobytes()).hexdigest()


def load_protocol(path: str, windows: int | None):
    """(calib [N, L], eval windows [W, 2048], metadata) with each tensor's sha256 checked."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = json.loads(meta["sha256"])
    for k, t in tensors.items():
        got = tensor_sha256(t)
        if got != expected[k]:
            raise SystemExit(f"{path}: sha256 of {k} is {got}, metadata says {expected[k]}")
    ev = tensors["eval"]
    if windows:
        ev = ev[:windows]
    return tensors["calib"], ev, meta


# ----------------------------------------------------------------------------- perplexity (lrquant's loop)


def window_loss(logits, input_ids) -> float:
    import torch
    import torch.nn.functional as F

    rows = logits.shape[1] - 1
    targets = input_ids[0, 1:]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, rows, LOSS_CHUNK_ROWS):
        stop = min(start + LOSS_CHUNK_ROWS, rows)
        total += F.cross_entropy(logits[0, start:stop].float(), targets[start:stop], reduction="sum").double()
    return (total / rows).item()


def perplexity(model, windows) -> tuple[float, float]:
    """(ppl, seconds) over the rows of ``windows`` [W, S], each scored independently."""
    import torch

    model.eval()
    losses = []
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(windows.shape[0]):
            batch = windows[i : i + 1]
            out = model(batch, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            losses.append(window_loss(logits, batch))
            del out, logits
            print(f"  window {i + 1}/{windows.shape[0]}: running ppl {math.exp(sum(losses) / len(losses)):.4f}",
                  file=sys.stderr, flush=True)
    nll = sum(losses) / len(losses)
    return (math.exp(nll) if nll < 709 else math.inf), time.perf_counter() - started


# ----------------------------------------------------------------------------- llm-compressor schemes


def ct_config_groups(wbits: int, abits: int, group: int) -> dict:
    """compressed-tensors config groups: asymmetric int weights (group or per channel) on every Linear, and
    for abits < 16 dynamic asymmetric per-token int activations; no KV cache scheme (KV stays 16 bit)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if group:
        weights = QuantizationArgs(num_bits=wbits, type="int", symmetric=False, strategy="group", group_size=group)
    else:
        weights = QuantizationArgs(num_bits=wbits, type="int", symmetric=False, strategy="channel")
    acts = None
    if abits < 16:
        acts = QuantizationArgs(num_bits=abits, type="int", symmetric=False, strategy="token", dynamic=True)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}


def llmc_recipe(peer: str, wbits: int, abits: int, group: int) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups = ct_config_groups(wbits, abits, group)
    ignore = ["lm_head"]
    if peer == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if peer == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore)]
    if peer == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)]
    if peer == "sq-gptq":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=SQ_STRENGTH), GPTQModifier(config_groups=groups, ignore=ignore)]
    if peer == "spinquant-gptq":
        from llmcompressor.modifiers.transform.spinquant import SpinQuantModifier

        return [SpinQuantModifier(rotations=list(SPIN_ROTATIONS), transform_type=SPIN_TYPE),
                GPTQModifier(config_groups=groups, ignore=ignore)]
    raise SystemExit(f"unknown llm-compressor peer {peer!r}")


def run_llmcompressor(peer: str, model, tokenizer, calib, wbits: int, abits: int,
                      group: int) -> tuple[float, float, str]:
    import torch
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    samples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in calib]
    loader = DataLoader(samples, batch_size=1, shuffle=False)  # in order, one [1, seqlen] sample per batch
    recipe = llmc_recipe(peer, wbits, abits, group)
    started = time.perf_counter()
    cpu0 = time.process_time()
    oneshot(model=model, tokenizer=tokenizer, dataset=loader, recipe=recipe,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    return seconds, time.process_time() - cpu0, "; ".join(repr(m) for m in recipe)


def run_autoround(model, tokenizer, calib, wbits: int, abits: int, group: int, iters: int) -> tuple[float, float, str]:
    if abits < 16:
        raise SystemExit("autoround rows are weight-only here (WxA16gG)")
    from auto_round import AutoRound

    data = [row.unsqueeze(0) for row in calib]  # auto-round takes a list of [1, seqlen] token tensors
    kwargs = dict(bits=wbits, group_size=group or -1, sym=False, iters=iters, nsamples=calib.shape[0],
                  seqlen=calib.shape[1], batch_size=8, dataset=data, device_map="cpu",
                  enable_torch_compile=False, seed=0)
    started = time.perf_counter()
    cpu0 = time.process_time()
    ar = AutoRound(model, tokenizer, scheme="W4A16", **kwargs)
    model_q, _ = ar.quantize()
    seconds = time.perf_counter() - started
    cpu_s = time.process_time() - cpu0
    if model_q is not model:  # quantize() returns the (in-place) fake-quant model
        model.load_state_dict(model_q.state_dict(), strict=False)
    shown = {k: v for k, v in kwargs.items() if k != "dataset"}
    return seconds, cpu_s, f"AutoRound({shown})"


# ----------------------------------------------------------------------------- checks


def forward_check(model, wbits: int, abits: int, group: int) -> dict:
    """What the forward of ``layers.0.self_attn.q_proj`` really computes (q_proj has no online rotation).

    ``lin(I)`` gives its effective weight W_eff^T (+ bias): a one-hot row is exact under per-token asymmetric
    quantization, so this holds with activation quantization too. Reports the most distinct values in one
    weight group of W_eff (<= 2**wbits when weights are fake-quantized in the forward) and the relative
    difference between ``lin(x)`` and ``x @ W_eff^T`` on a random x (> 0 when activations are quantized).
    """
    import torch

    lin = model.model.layers[0].self_attn.q_proj
    n = lin.in_features
    with torch.no_grad():
        bias = lin.bias if lin.bias is not None else 0
        w_eff = (lin(torch.eye(n).unsqueeze(0))[0] - bias).T  # [out, in]
        g = group or n
        levels = max(torch.unique(w_eff[r, c : c + g]).numel() for r in range(16) for c in range(0, n, g))
        x = torch.randn(1, 8, n, generator=torch.Generator().manual_seed(0))
        y = lin(x)
        y_ref = x @ w_eff.T + bias
        act_err = ((y - y_ref).norm() / y_ref.norm()).item()
    return {"q_proj_max_levels_per_group": levels, "weight_levels_ok": levels <= 2**wbits,
            "q_proj_act_quant_rel_err": act_err, "act_quant_seen": act_err > 1e-6,
            "quantization_status": str(getattr(lin, "quantization_status", None))}


def one_row(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib, windows, meta = load_protocol(args.protocol, args.windows)
    if args.calib_samples:
        calib = calib[: args.calib_samples]
    model_path = args.model or meta["model_path"]
    peer, _, setting = args.one.partition(":")
    setting = setting or "FP"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calib_s, calib_cpu_s, detail = 0.0, 0.0, ""
    load_start = os.getloadavg()[0]
    wbits = abits = 16
    group = 0
    if peer != "fp":
        wbits, abits, group = parse_setting(setting)
        if peer == "autoround":
            calib_s, calib_cpu_s, detail = run_autoround(model, tokenizer, calib, wbits, abits, group, args.iters)
        else:
            calib_s, calib_cpu_s, detail = run_llmcompressor(peer, model, tokenizer, calib, wbits, abits, group)
        model = model.to(torch.float32)
    quant_info = {}
    if peer != "fp":
        quant_info = forward_check(model, wbits, abits, group)
        lin = model.model.layers[0].self_attn.q_proj
        scheme = getattr(lin, "quantization_scheme", None)
        if scheme is not None and scheme.input_activations is not None:
            quant_info["input_activations"] = scheme.input_activations.model_dump(exclude_none=True)
        print(f"check: {quant_info}", file=sys.stderr, flush=True)
        if not quant_info["weight_levels_ok"] or quant_info["act_quant_seen"] != (abits < 16):
            raise SystemExit(f"{args.one}: the forward does not apply the quantization: {quant_info}")
    ppl, eval_s = perplexity(model, windows)
    return {
        "peer": peer, "setting": setting, "ppl": ppl, "calib_time_s": round(calib_s, 2),
        "calib_cpu_s": round(calib_cpu_s, 1), "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_gb": peak_rss_gb(),
        "versions": versions(), "eval_s": round(eval_s, 1), "windows": int(windows.shape[0]),
        "nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "threads": args.threads,
        "iters": args.iters if peer == "autoround" else None, "model": meta.get("model_name", model_path),
        "protocol_sha256": json.loads(meta["sha256"]), "recipe": detail, "check": quant_info,
    }


def peak_rss_gb() -> float:
    """Peak RSS (GiB) from ``VmHWM``: ``ru_maxrss`` would carry the launching bench's high-water mark across
    ``exec`` (as ``lrquant.runs.peak_rss_gb``; this venv has no lrquant)."""
    with open("/proc/self/status") as fh:
        return round(next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024**2, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", required=True, help="file written by dump_protocol.py")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated PEER:SETTING (peers: {', '.join(PEERS)})")
    p.add_argument("--output", required=True, help="JSONL file; one line is appended per finished row")
    p.add_argument("--windows", type=int, default=0, help="score only the first N windows of the dump (0 = all)")
    p.add_argument("--calib-samples", type=int, default=0, help="smoke tests: only the first N calibration samples")
    p.add_argument("--iters", type=int, default=50, help="auto-round iterations per block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model folder (default: the one stored in the protocol file)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args(argv)

    if args.one:
        row = one_row(args)
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    load_protocol(args.protocol, None)  # fail early on a bad file
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    failed = 0
    for spec in [r.strip() for r in args.rows.split(",") if r.strip()]:
        peer = spec.partition(":")[0]
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
        cmd = [sys.executable, __file__, "--protocol", args.protocol, "--output", args.output, "--one", spec,
               "--windows", str(args.windows),
               "--calib-samples", str(args.calib_samples), "--iters", str(args.iters), "--threads", str(args.threads)]
        if args.model:
            cmd += ["--model", args.model]
        print(f"=== {spec} ({time.strftime('%H:%M:%S')})", flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            failed += 1
            print(f"=== {spec} FAILED (exit {proc.returncode})", flush=True)
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        with open(args.output, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"=== {spec}: ppl {row['ppl']:.3f}, calib {row['calib_time_s']} s, peak RSS {row['peak_rss_gb']} GB",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
