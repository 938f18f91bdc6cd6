"""Scaling past one process and past RAM (issue 15): data parallel over gloo matches one process,
streams kept within a RAM budget (the rest memory-mapped) give the same weights, and a model streamed block
by block from sharded safetensors gives the same checkpoint as the in-RAM run."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import CASES, tiny_llama

from lrquant import api
from lrquant.config import CalibArgs, Recipe, Scheme, TrainArgs
from lrquant.streams import StreamStore

TOL = 1e-5  # gradient all-reduce sums in another order than one batch's backward: float32 rounding only


def _recipe(method: str, **options) -> Recipe:
    recipe = Recipe(method=method, scheme=Scheme.from_bits(4, 16, 32), calib=CalibArgs(nsamples=4, seqlen=16),
                    train=TrainArgs(batch_size=2, iters=3, lr={"lwc": 0.2, "let": 0.05}))
    return recipe.with_options(options) if options else recipe


def _calib() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _quantized(recipe: Recipe, **kwargs) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    api.quantize(model, recipe, _calib(), progress=False, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, init_file: str, recipe_dict: dict, out: str) -> None:
    """One data-parallel rank: quantize with a checkpoint (rank 0 writes it), then resume from it on every
    rank (each rank reads rank 0's blocks); rank 0 saves both results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        recipe = Recipe.from_dict(recipe_dict)
        ckpt = Path(out).with_name("checkpoint")
        weights = _quantized(recipe, checkpoint_dir=ckpt)
        dist.barrier()
        resumed = _quantized(recipe, checkpoint_dir=ckpt, resume=True)
        if rank == 0:
            torch.save({"run": weights, "resumed": resumed}, out)
    finally:
        dist.destroy_process_group()


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12))
               for k in a if a[k].is_floating_point())


def test_two_gloo_processes_match_one(tmp_path):
    """Same seed, same global batch: 2 data-parallel processes end with the weights of one process (a learned
    method with GPTQ rounding: gradient averaging, loss reduction, range and Hessian reductions), and a
    resume under the 2 processes restores rank 0's checkpoint bit for bit."""
    torch.set_num_threads(1)
    recipe = _recipe("omniquant", **{"rounding.kind": "gptq"})
    single = _quantized(recipe)
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), recipe.to_dict(), str(out)), nprocs=2, join=True)
    saved = torch.load(out)
    parallel = saved["run"]
    assert _max_rel_diff(parallel, single) < TOL
    assert all(torch.equal(saved["resumed"][k], parallel[k]) for k in parallel)  # resume under torchrun
    # the comparison can see training: three steps move the weights far beyond TOL
    assert _max_rel_diff(_quantized(recipe.with_options({"train.iters": 0})), single) > 100 * TOL


def test_stream_budget_respected_and_same_weights(tmp_path):
    """A budget below one stream puts every stream in a memory-mapped file (none stays in RAM), the files
    are gone at the end, and the weights are bit-identical to the in-RAM run."""
    recipe = _recipe("omniquant")
    ram = _quantized(recipe)
    store = StreamStore(budget_bytes=1024, folder=tmp_path / "streams")
    mapped = _quantized(recipe, store=store)
    assert store.files_made >= 4 and store.peak_in_ram == 0
    assert not any((tmp_path / "streams").glob("*.bin"))
    assert all(torch.equal(mapped[k], ram[k]) for k in ram)


def test_stream_budget_splits_ram_and_files(tmp_path):
    """A budget of two fp32 streams keeps at most two in RAM and maps the others."""
    one = 4 * 16 * 64 * 4  # [N, L, H] fp32 bytes of the tiny model's streams
    store = StreamStore(budget_bytes=2 * one, folder=tmp_path / "streams")
    _quantized(_recipe("omniquant"), store=store)
    assert 0 < store.peak_in_ram <= 2 * one and store.files_made > 0


def test_bf16_streams_close_to_fp32():
    """bf16 streams halve the memory; the result stays close to the fp32-stream run."""
    recipe = _recipe("omniquant")
    fp32 = _quantized(recipe)
    bf16 = _quantized(recipe, store=StreamStore(dtype=torch.bfloat16))
    assert _max_rel_diff(bf16, fp32) < 0.1


@pytest.mark.skipif(os.environ.get("LRQUANT_SKIP_SLOW") == "1", reason="slow tests skipped")
def test_release_drops_resident_pages(tmp_path):
    """File-backed streams give their pages back: RSS does not grow by the stream's size once released."""
    def rss_kb() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

    store = StreamStore(budget_bytes=0, folder=tmp_path)
    t = store.empty((64, 1024, 256))  # 64 MiB
    before = rss_kb()
    t.fill_(1.0)
    touched = rss_kb()
    store.release(t)
    released = rss_kb()
    assert touched - before > 50_000 and released - before < 10_000
    assert float(t[3, 5, 7]) == 1.0  # the data is still there
    store.free(t)
    store.close()


# ---- models larger than RAM: blocks streamed from safetensors shards --------------------------------------
def _sharded(tmp_path, layers: int = 3):
    model = tiny_llama(layers=layers)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _read_folder(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", ["rtn", "omniquant"])
def test_streamed_blocks_write_the_in_ram_checkpoint(tmp_path, method):
    """A meta skeleton whose blocks are read from several shards when reached, written shard by shard,
    gives exactly the checkpoint ``save_pretrained`` writes for the in-RAM run; the skeleton holds no
    block weights afterwards; transformers loads the result."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lrquant.export.qparams import quant_state
    from lrquant.streaming import SafetensorsSource, ShardWriter, load_skeleton

    folder = _sharded(tmp_path)
    recipe = _recipe(method)
    ram = tiny_llama(layers=3)
    api.quantize(ram, recipe, _calib(), progress=False)
    ram.save_pretrained(tmp_path / "ram")
    skeleton = load_skeleton(str(folder))
    assert all(p.is_meta for p in skeleton.parameters())
    out = tmp_path / "streamed"
    out.mkdir()
    source = SafetensorsSource(folder)
    source.writer = writer = ShardWriter.for_model(out, skeleton, source, tmp_path / "qparams.spool")
    api.quantize(skeleton, recipe, _calib(), progress=False, source=source,
                 store=StreamStore(budget_bytes=0, folder=tmp_path / "streams"))
    writer.finish(skeleton, source)
    writer.qparams.write(tmp_path / "qparams.safetensors")
    qparams = load_file(tmp_path / "qparams.safetensors")
    in_ram = quant_state(ram)
    assert qparams.keys() == in_ram.keys() and all(torch.equal(qparams[k], in_ram[k]) for k in in_ram)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    assert len(list(out.glob("model-*.safetensors"))) == 3 + 3  # 3 blocks, embeddings, norm, head
    expected, got = _read_folder(tmp_path / "ram"), _read_folder(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    AutoModelForCausalLM.from_pretrained(out)


def test_copy_tensor_in_chunks(tmp_path):
    """Tensors outside the blocks are copied a few rows at a time (chunks far smaller than the tensor here):
    every dtype, a scalar, an empty tensor, with and without a cast, equal ``get_tensor(key).to(dtype)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lrquant.streaming import copy_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 5, generator=g), "b": torch.randn(11, 3, 2, generator=g).bfloat16(),
               "s": torch.tensor(7, dtype=torch.int64), "m": torch.rand(9, generator=g) > 0.5,
               "e": torch.empty(0, 4)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    for key, value in tensors.items():
        for dtype in (None, torch.float32 if value.is_floating_point() else None):
            out = tmp_path / f"{key}-{dtype}.safetensors"
            shape, written = copy_tensor(tmp_path / "in.safetensors", key, out, dtype, chunk_bytes=24)
            with safe_open(str(out), framework="pt") as fh:
                got = fh.get_tensor(key)
            expected = value.to(dtype or value.dtype)
            assert shape == list(value.shape) and written == expected.dtype and got.dtype == expected.dtype
            assert torch.equal(got, expected)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold is a glibc setting")
def test_streaming_hands_freed_weight_buffers_back():
    """In a streamed run a freed weight-sized temporary leaves the process at once. glibc's default
    threshold for giving a buffer its own mapping rises to the largest buffer freed so far (up to 32 MiB);
    weights and their quantization temporaries then came from the heap and stayed resident, by an amount
    that changed from block to block (the run's peak is its worst block). Run in a fresh process: earlier
    heap use in this one could leave free chunks that glibc reuses first."""
    import subprocess

    code = """
import torch
from lrquant.streaming import free_large_buffers_at_once

free_large_buffers_at_once()

def rss_kb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

big = torch.ones(30 << 18)  # 30 MiB: under glibc's default this would raise the threshold to 30 MiB
del big
before = rss_kb()
t = torch.ones(16 << 18)  # 16 MiB, touched
during = rss_kb()
del t
print(during - before, rss_kb() - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    during, after = (int(x) for x in done.stdout.split())
    assert during > 12_000 and after < 4_000


def test_stream_blocks_refuses_what_it_cannot_do(tiny_model_dir, tmp_path, capsys):
    """--stream-blocks with an evaluation or a GGUF export: one line, exit 2, nothing created."""
    from lrquant.cli import main

    out = tmp_path / "run"
    code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--quiet", "--stream-blocks",
                 "--eval", "default"])
    assert code == 2 and "--stream-blocks" in capsys.readouterr().err and not out.exists()
    code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--quiet", "--stream-blocks",
                 "--format", "gguf"])
    assert code == 2 and "--format gguf" in capsys.readouterr().err and not out.exists()
    code = main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--quiet",
                 "--stream-budget-gb", "-1", "--eval", "none"])
    assert code == 2 and "--stream-budget-gb" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("scheme", [["--wbits", "4", "--group-size", "32"], ["--wbits", "8", "--abits", "8"]],
                         ids=["W4A16g32", "W8A8"])
def test_streamed_compressed_export_is_the_in_ram_export(tiny_model_dir, tmp_path, scheme):
    """``--stream-blocks --format compressed-tensors`` writes the export block by block: the same tensors,
    quantization config and sidecar as the in-RAM run's export, and it reloads with the same logits."""
    from lrquant.cli import main
    from lrquant.export import load_compressed

    args = ["quantize", "--model", str(tiny_model_dir), "--method", "omniquant", "--nsamples", "4", "--seqlen", "32",
            "--batch-size", "2", "--option", "train.iters=2", "--eval", "none", "--quiet",
            "--format", "compressed-tensors", *scheme]
    assert main([*args, "--output", str(tmp_path / "ram")]) == 0
    assert main([*args, "--output", str(tmp_path / "streamed"), "--stream-blocks"]) == 0
    ram, streamed = tmp_path / "ram" / "compressed", tmp_path / "streamed" / "compressed"
    expected, got = _read_folder(ram), _read_folder(streamed)
    assert expected.keys() == got.keys() and any(k.endswith(".weight_scale") for k in got)
    assert all(torch.equal(expected[k], got[k]) and expected[k].dtype == got[k].dtype for k in expected)
    for name in ("config.json", "lrquant_export.json"):
        want, have = (json.loads((d / name).read_text()) for d in (ram, streamed))
        if name == "config.json":
            want, have = want["quantization_config"], have["quantization_config"]
        assert want == have, name
    res = json.loads((tmp_path / "streamed" / "results.json").read_text())
    assert res["export"]["format"] == "compressed-tensors" and res["export"]["path"] == str(streamed)
    ids = torch.randint(1, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(streamed)(ids).logits, load_compressed(ram)(ids).logits,
                                   atol=0, rtol=0)


def test_streamed_run_resumes_to_the_same_model_and_export(tiny_model_dir, tmp_path, monkeypatch):
    """A streamed run killed while writing block 1 leaves no model/ or compressed/ but its checkpoint; resumed,
    it restores the blocks, writes them again and gives both folders of the uninterrupted run."""
    from lrquant.streaming import ShardWriter

    recipe = _recipe("omniquant")
    kwargs = {"stream_blocks": True, "export_format": "compressed-tensors", "progress": False}
    api.run(str(tiny_model_dir), recipe, tmp_path / "full", **kwargs)
    write = ShardWriter.write_block

    def killed_at_block_1(self, index, name, block):
        if index == 1:
            raise KeyboardInterrupt
        write(self, index, name, block)

    part = tmp_path / "part"
    with monkeypatch.context() as m:
        m.setattr(ShardWriter, "write_block", killed_at_block_1)
        with pytest.raises(KeyboardInterrupt):
            api.run(str(tiny_model_dir), recipe, part, **kwargs)
    assert not (part / "model").exists() and not (part / "compressed").exists() and (part / "checkpoint").is_dir()
    res = api.run(str(tiny_model_dir), recipe, part, resume=True, **kwargs).results
    assert res["resumed_blocks"] == 2  # block 1 was checkpointed before it was handed to the writer
    for name in ("model", "compressed"):
        a, b = _read_folder(tmp_path / "full" / name), _read_folder(part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tiny_model_dir, tmp_path):
    """``torchrun --nproc-per-node 2 -m lrquant quantize`` (gloo) writes the model one process writes, rank 0
    alone writing the run folder; then a streamed run of the same job writes it too."""
    import subprocess
    import sys

    args = ["quantize", "--model", str(tiny_model_dir), "--method", "omniquant", "--nsamples", "4", "--seqlen",
            "32", "--batch-size", "2", "--option", "train.iters=3", "--eval", "none", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    runs = {"one": [sys.executable, "-m", "lrquant"], "two": [str(torchrun), "--nproc-per-node", "2", "-m", "lrquant"]}
    for name, launcher in runs.items():
        done = subprocess.run([*launcher, *args, "--output", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "lrquant", *args, "--output", str(tmp_path / "streamed"),
                           "--stream-blocks", "--stream-budget-gb", "0"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one = _read_folder(tmp_path / "one" / "model")
    assert _max_rel_diff(_read_folder(tmp_path / "two" / "model"), one) < TOL
    streamed = _read_folder(tmp_path / "streamed" / "model")
    assert all(torch.equal(streamed[k], one[k]) for k in one) and streamed.keys() == one.keys()
    assert not (tmp_path / "two" / "checkpoint").exists() and (tmp_path / "two" / "results.json").is_file()


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "gemma3_mm"], ids=lambda c: c.name)
def test_streamed_blocks_every_text_family(tmp_path, case):
    """RTN streamed from shards writes what ``save_pretrained`` of the in-RAM run writes, on every text
    family (tied heads, QK-norm, OPT's learned positions and biases)."""
    from lrquant.streaming import SafetensorsSource, ShardWriter, load_skeleton

    torch.manual_seed(0)
    case.build().save_pretrained(tmp_path / "src", max_shard_size="50KB")
    recipe = Recipe(method="rtn", scheme=Scheme.from_bits(4, 16, 32), calib=CalibArgs(nsamples=2, seqlen=8))
    calib = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ram = case.build().eval()
    api.quantize(ram, recipe, calib, progress=False)
    ram.save_pretrained(tmp_path / "ram")
    skeleton = load_skeleton(str(tmp_path / "src"))
    out = tmp_path / "streamed"
    out.mkdir()
    source = SafetensorsSource(tmp_path / "src")
    source.writer = writer = ShardWriter.for_model(out, skeleton, source, tmp_path / "qparams.spool")
    api.quantize(skeleton, recipe, calib, progress=False, source=source)
    writer.finish(skeleton, source)
    expected, got = _read_folder(tmp_path / "ram"), _read_folder(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
