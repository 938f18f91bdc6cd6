"""Compare runs: a Markdown and an HTML report with tables of perplexity, zero-shot accuracy and cost, and
PNG plots (perplexity per method across bit settings, per-block training losses, per-layer error).

Every run directory holds the ``results.json`` the pipeline writes; any key may be missing, and a section
or plot without data says so instead of failing. The report is built once as a list of blocks (heading,
paragraph, table, image) rendered to both formats, so the two never disagree. Plots use matplotlib's Agg
canvas through the object API (no pyplot state); every file is written atomically.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LrquantError
from .io import atomic_write_bytes, atomic_write_text

PLOT_PPL = "ppl_by_bits.png"
PLOT_BLOCK_LOSS = "block_losses.png"
PLOT_EPOCH_LOSS = "loss_curves.png"
PLOT_BLOCK_ERR = "block_output_error.png"
PLOT_LAYER_ERR = "layer_errors.png"


# ----------------------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """One run's results, with the label it has in tables and legends."""

    label: str
    path: Path
    data: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.data.get("method") or "unknown")

    @property
    def scheme(self) -> str:
        return str(self.data.get("scheme_name") or "-")

    @property
    def model(self) -> str:
        return str(self.data.get("model") or "model")


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """Read ``results.json`` of every run; labels are the folder names, made unique with their parents.

    Raises :class:`LrquantError` naming a folder without a readable ``results.json``.
    """
    runs: list[Run] = []
    for d in map(Path, run_dirs):
        f = d / "results.json"
        if not f.is_file():
            raise LrquantError(f"{d}: no results.json (not a finished lrquant run directory)")
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LrquantError(f"{f}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise LrquantError(f"{f}: expected a JSON object")
        runs.append(Run(label=d.resolve().name, path=d, data=data))
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.path.resolve().parent.name}/{r.label}"
    return runs


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def scheme_sort_key(name: str) -> tuple:
    """Order bit settings from high to low precision: ``W8A8`` < ``W4A16`` < ``W4A16g128`` < ``W4A4``...

    Weight bits first (descending), then activation bits (descending), then group size (per-channel,
    i.e. no group, first, then larger groups). Names that do not parse sort last, alphabetically.
    """
    m = re.fullmatch(r"W(\d+)A(\d+)(?:g(\d+))?.*", name)
    if not m:
        return (1, 0, 0, 0, name)
    w, a, g = int(m[1]), int(m[2]), int(m[3]) if m[3] else 0
    return (0, -w, -a, 0 if g == 0 else 1 / g, name)


# ---------------------------------------------------------------------------------------------- document
@dataclass
class Doc:
    """A report as blocks: ``("h1"|"h2"|"p", text)``, ``("table", header, rows, text_cols)``,
    ``("img", file, alt)``."""

    blocks: list[tuple] = field(default_factory=list)

    def h1(self, text: str) -> None:
        self.blocks.append(("h1", text))

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]], text_cols: int = 1) -> None:
        """A table whose first ``text_cols`` columns are left-aligned text, the others right-aligned."""
        self.blocks.append(("table", header, rows, text_cols))

    def img(self, file: str, alt: str) -> None:
        self.blocks.append(("img", file, alt))


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Doc) -> str:
    out: list[str] = []
    for b in doc.blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {b[1]}\n")
        elif kind == "h2":
            out.append(f"## {b[1]}\n")
        elif kind == "p":
            out.append(f"{b[1]}\n")
        elif kind == "table":
            header, rows, text_cols = b[1], b[2], b[3]
            out.append("| " + " | ".join(map(_md_cell, header)) + " |")
            out.append("|" + "|".join(":---" if i < text_cols else "---:" for i in range(len(header))) + "|")
            out.extend("| " + " | ".join(map(_md_cell, r)) + " |" for r in rows)
            out.append("")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td{text-align:right}td.t{text-align:left}img{max-width:100%;margin:1em 0}
code{background:#f3f3f3;padding:0 3px}"""


def _inline_html(text: str) -> str:
    """Escape ``text`` and render Markdown's inline ``code`` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(doc: Doc, title: str) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in doc.blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
                       + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(("<td class='t'>" if i < b[3] else "<td>") + f"{html.escape(c)}</td>"
                                        for i, c in enumerate(r)) + "</tr>" for r in b[2])
            out.append("</tbody></table>")
        elif kind == "img":
            out.append(f"<img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _fp_values(runs: list[Run], key: str) -> dict[str, dict[str, Any]]:
    """Per model, the first run's FP entry ``key`` (``fp_ppl`` or ``fp_zeroshot``) that is present."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        v = r.data.get(key)
        if isinstance(v, dict) and v and r.model not in out:
            out[r.model] = v
    return out


def ppl_table(runs: list[Run]) -> tuple[list[str], list[list[str]]] | None:
    """Rows: FP per model, then each run; columns: every evaluation dataset; run cells ``ppl (Δ vs FP)``."""
    fp = _fp_values(runs, "fp_ppl")
    datasets = sorted({k for r in runs for key in ("ppl", "fp_ppl") for k in (r.data.get(key) or {})})
    if not datasets:
        return None
    header = ["run", "method", "bits", *datasets]
    rows = [[f"FP ({model})", "fp", "-", *(_fmt(_num(v.get(d))) for d in datasets)]
            for model, v in fp.items()]
    for r in runs:
        ppl, ref = r.data.get("ppl") or {}, fp.get(r.model, {})
        cells = []
        for d in datasets:
            x, x0 = _num(ppl.get(d)), _num(ref.get(d))
            cells.append(_fmt(x) + (f" ({x - x0:+.2f})" if x is not None and x0 is not None else ""))
        rows.append([r.label, r.method, r.scheme, *cells])
    return header, rows


def _zs_cell(m: Any) -> str:
    if not isinstance(m, dict) or _num(m.get("acc")) is None:
        return "-"
    cell = f"{100 * m['acc']:.1f}"
    if _num(m.get("acc_norm")) is not None:
        cell += f" / {100 * m['acc_norm']:.1f}"
    return cell


def _mean_acc(zs: dict[str, Any], tasks: list[str]) -> float | None:
    accs = [_num((zs.get(t) or {}).get("acc")) for t in tasks]
    return None if not accs or any(a is None for a in accs) else sum(accs) / len(accs)


def zeroshot_table(runs: list[Run]) -> tuple[list[str], list[list[str]]] | None:
    """Rows: FP per model, then each run; cells ``acc / acc_norm`` in percent; mean acc and its Δ vs FP."""
    fp = _fp_values(runs, "fp_zeroshot")
    tasks = sorted({t for r in runs for key in ("zeroshot", "fp_zeroshot") for t in (r.data.get(key) or {})})
    if not tasks:
        return None
    header = ["run", "method", "bits", *tasks, "mean acc", "Δ mean vs FP"]
    rows = []
    for model, zs in fp.items():
        rows.append([f"FP ({model})", "fp", "-", *(_zs_cell(zs.get(t)) for t in tasks),
                     _fmt(_pct(_mean_acc(zs, tasks)), ".1f"), ""])
    for r in runs:
        zs = r.data.get("zeroshot") or {}
        mean, mean0 = _mean_acc(zs, tasks), _mean_acc(fp.get(r.model, {}), tasks)
        delta = f"{100 * (mean - mean0):+.1f}" if mean is not None and mean0 is not None else "-"
        rows.append([r.label, r.method, r.scheme, *(_zs_cell(zs.get(t)) for t in tasks),
                     _fmt(_pct(mean), ".1f"), delta])
    return header, rows


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def cost_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Calibration time, peak memory and the mean per-block loss before/after training, per run."""
    header = ["run", "model", "method", "bits", "calib time (s)", "peak RSS (GB)", "blocks",
              "mean init loss", "mean final loss"]
    rows = []
    for r in runs:
        blocks = [b for b in r.data.get("blocks") or [] if isinstance(b, dict)]
        init = [v for b in blocks if (v := _num(b.get("init_loss"))) is not None]
        final = [v for b in blocks if (v := _num(b.get("final_loss"))) is not None]
        rows.append([r.label, r.model, r.method, r.scheme, _fmt(_num(r.data.get("calib_time_s")), ".1f"),
                     _fmt(_num(r.data.get("peak_rss_gb")), ".2f"), str(len(blocks)) if blocks else "-",
                     _fmt(sum(init) / len(init) if init else None, ".3g"),
                     _fmt(sum(final) / len(final) if final else None, ".3g")])
    return header, rows


# ------------------------------------------------------------------------------------------------- plots
def _figure(nplots: int, width: float = 5.5, height: float = 3.8, ncols: int = 2, sharey: bool = False):
    """A Figure on an Agg canvas with ``nplots`` axes in a grid (unused cells hidden); ``sharey`` puts
    every panel on one y scale so runs compare at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, nplots))
    nrows = math.ceil(nplots / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[nplots:]:
        ax.set_visible(False)
    return fig, list(axes[:nplots])


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def plot_ppl(runs: list[Run], path: Path) -> bool:
    """One panel per dataset: PPL (log y) against bit setting, one line per method, FP dashed."""
    datasets = sorted({d for r in runs for d in (r.data.get("ppl") or {})})
    if not datasets:
        return False
    schemes = sorted({r.scheme for r in runs if r.data.get("ppl")}, key=scheme_sort_key)
    xpos = {s: i for i, s in enumerate(schemes)}
    fp = _fp_values(runs, "fp_ppl")
    methods = sorted({r.method for r in runs})
    fig, axes = _figure(len(datasets))
    for ax, d in zip(axes, datasets, strict=True):
        for k, method in enumerate(methods):
            pts = sorted((xpos[r.scheme], v) for r in runs if r.method == method
                         and (v := _num((r.data.get("ppl") or {}).get(d))) is not None)
            if not pts:
                continue
            dodge = (k - (len(methods) - 1) / 2) * 0.06  # side by side where methods share a setting
            color = f"C{k % 10}"
            for seg in _consecutive(pts):  # no line across a setting this method was not run at
                ax.plot([x + dodge for x, _ in seg], [y for _, y in seg], color=color, marker="os^Dv<>"[k % 7],
                        label=method if seg[0] == pts[0] else None)
        for j, (model, v) in enumerate(fp.items()):
            if (y := _num(v.get(d))) is not None:
                ax.axhline(y, color="k", ls="--", lw=1, alpha=0.7 - 0.2 * (j % 3),
                           label=f"FP ({model}) {y:.2f}" if len(fp) > 1 else f"FP {y:.2f}")
        ax.set_yscale("log")
        ax.margins(y=0.1)
        _plain_log_ticks(ax)
        ax.set_xticks(range(len(schemes)), schemes, rotation=30 if len(schemes) > 4 else 0)
        ax.set_xlim(-0.5, len(schemes) - 0.5)
        ax.set_xlabel("bit setting")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{d} perplexity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def _consecutive(pts: list[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """Split points sorted by x into runs of adjacent x positions: ``[(0,a),(1,b),(3,c)]`` -> 2 runs."""
    segs: list[list[tuple[int, float]]] = []
    for p in pts:
        if segs and p[0] == segs[-1][-1][0] + 1:
            segs[-1].append(p)
        else:
            segs.append([p])
    return segs


def _plain_log_ticks(ax) -> None:
    """Label a log y-axis with plain numbers (``20``, ``30``) instead of ``2×10^1``; over a wide range
    (more than a factor 20) only the minor ticks at 2× and 5× a power of ten are labelled."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_ylim()
    wide = hi / lo >= 20

    def minor(v: float, _pos) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if not wide or mantissa in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _run_title(r: Run) -> str:
    return f"{r.label}: {r.method} {r.scheme}"


def _block_series(r: Run, key: str) -> list[tuple[int, float]]:
    """``(block index, value)`` of the positive numbers under ``key`` in the run's ``blocks`` entries."""
    pts = []
    for i, b in enumerate(r.data.get("blocks") or []):
        if isinstance(b, dict) and (v := _num(b.get(key))) is not None and v > 0:
            pts.append((int(b.get("block", i)), v))
    return pts


def plot_block_losses(runs: list[Run], path: Path) -> bool:
    """One panel per trained run: block loss before (init) and after (final) training, per block (log y)."""
    trained = [r for r in runs if _block_series(r, "init_loss") or _block_series(r, "final_loss")]
    if not trained:
        return False
    fig, axes = _figure(len(trained), sharey=True)
    for ax, r in zip(axes, trained, strict=True):
        for key, style in (("init_loss", dict(marker="o", color="tab:red", label="before training")),
                           ("final_loss", dict(marker="s", color="tab:blue", label="after training"))):
            if pts := _block_series(r, key):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=4, **style)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("block loss (log)")
        ax.set_title(_run_title(r))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def plot_block_output_error(runs: list[Run], path: Path) -> bool:
    """All runs on one axis: relative error of each quantized block's output (``out_rel_err``) per block."""
    series = [(r, pts) for r in runs if (pts := _block_series(r, "out_rel_err"))]
    if not series:
        return False
    fig, (ax,) = _figure(1, width=8.0, height=4.2)
    for k, (r, pts) in enumerate(series):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^Dv<>"[k % 7], ms=4, label=_run_title(r))
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("block")
    ax.set_ylabel("relative block output error (log)")
    ax.set_title("Quantized block output vs full-precision block output")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def plot_epoch_losses(runs: list[Run], path: Path) -> bool:
    """One panel per run: training loss per epoch, one line per block colored by depth (log y)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    def curves(r: Run) -> list[tuple[int, list[float]]]:
        out = []
        for i, b in enumerate(r.data.get("blocks") or []):
            if isinstance(b, dict) and isinstance(b.get("losses"), list):
                ys = [v for v in map(_num, b["losses"]) if v is not None and v > 0]
                if ys:
                    out.append((int(b.get("block", i)), ys))
        return out

    per_run = [(r, c) for r in runs if (c := curves(r))]
    if not per_run:
        return False
    fig, axes = _figure(len(per_run), sharey=True)
    cmap = colormaps["viridis"]
    for ax, (r, cs) in zip(axes, per_run, strict=True):
        norm = Normalize(vmin=min(b for b, _ in cs), vmax=max(max(b for b, _ in cs), min(b for b, _ in cs) + 1))
        for b, ys in cs:
            ax.plot(range(1, len(ys) + 1), ys, color=cmap(norm(b)), lw=1.2, marker="." if len(ys) < 30 else None)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="block")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss (log)")
        ax.set_title(_run_title(r))
        ax.grid(True, which="both", alpha=0.3)
    _save_png(fig, path)
    return True


def split_layer_name(name: str) -> tuple[int | None, str]:
    """``model.layers.12.self_attn.q_proj`` -> ``(12, "self_attn.q_proj")``: the last integer path
    component is the block index, what follows it the kind of linear; ``(None, name)`` without one."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return int(parts[i]), ".".join(parts[i + 1:]) or name
    return None, name


def plot_layer_errors(runs: list[Run], path: Path) -> bool:
    """One panel per run: relative weight error of every quantized linear against its block index, one
    line per kind of linear (q/k/v/o/gate/up/down...); layers outside blocks are drawn in name order."""
    with_err = [r for r in runs if isinstance(r.data.get("layer_errors"), dict) and r.data["layer_errors"]]
    if not with_err:
        return False
    fig, axes = _figure(len(with_err), width=6.5, sharey=True)
    for ax, r in zip(axes, with_err, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        loose: list[tuple[str, float]] = []
        for name, v in r.data["layer_errors"].items():
            if (x := _num(v)) is None:
                continue
            block, kind = split_layer_name(name)
            if block is None:
                loose.append((name, x))
            else:
                series.setdefault(kind, []).append((block, x))
        if series:
            for kind, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1.2, label=kind)
            ax.set_xlabel("block")
            ax.legend(fontsize=7, ncols=2)
        else:
            ax.plot(range(len(loose)), [v for _, v in loose], marker=".")
            ax.set_xticks(range(len(loose)), [n for n, _ in loose], rotation=90, fontsize=6)
            ax.set_xlabel("layer")
        ax.set_ylabel("relative weight error")
        ax.set_title(_run_title(r))
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    _save_png(fig, path)
    return True


# ------------------------------------------------------------------------------------------------ report
def build_report(runs: list[Run], out_dir: Path) -> Doc:
    """Write the plots into ``out_dir`` and return the report document that references them."""
    doc = Doc()
    doc.h1("lrquant report")
    doc.p("Runs: " + ", ".join(f"`{r.label}` ({r.method} {r.scheme}, {r.model})" for r in runs) + ".")

    doc.h2("Perplexity")
    if (t := ppl_table(runs)) is not None:
        ev = next((r.data["eval"] for r in runs if isinstance(r.data.get("eval"), dict)), None)
        note = f" Evaluated on {ev.get('windows', '?')} windows of {ev.get('seqlen', '?')} tokens." if ev else ""
        doc.p("Lower is better; in parentheses the change against the FP model." + note)
        doc.table(*t, text_cols=3)
    else:
        doc.p("No run has perplexity results.")
    if plot_ppl(runs, out_dir / PLOT_PPL):
        doc.img(PLOT_PPL, "perplexity per method across bit settings")

    doc.h2("Zero-shot accuracy")
    if (t := zeroshot_table(runs)) is not None:
        doc.p("Accuracy in percent, `acc / acc_norm` where the task has a length-normalized accuracy "
              "(lm-evaluation-harness). The mean is over `acc`.")
        doc.table(*t, text_cols=3)
    else:
        doc.p("No run has zero-shot results.")

    doc.h2("Cost")
    doc.table(*cost_table(runs), text_cols=4)

    doc.h2("Per-block training loss and output error")
    drew = False
    if plot_block_losses(runs, out_dir / PLOT_BLOCK_LOSS):
        doc.img(PLOT_BLOCK_LOSS, "per-block loss before and after training")
        drew = True
    if plot_epoch_losses(runs, out_dir / PLOT_EPOCH_LOSS):
        doc.img(PLOT_EPOCH_LOSS, "per-block training loss per epoch")
        drew = True
    if not drew:
        doc.p("No run has per-block losses (round-to-nearest runs train nothing).")
    if plot_block_output_error(runs, out_dir / PLOT_BLOCK_ERR):
        doc.img(PLOT_BLOCK_ERR, "per-block relative output error")

    doc.h2("Per-layer quantization error")
    if plot_layer_errors(runs, out_dir / PLOT_LAYER_ERR):
        doc.img(PLOT_LAYER_ERR, "per-layer relative weight quantization error")
    else:
        doc.p("No run has per-layer errors.")
    return doc


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Compare ``run_dirs``: write ``report.md``, ``report.html`` and PNG plots into ``out_dir``.

    Returns the path of ``report.md``. Raises :class:`LrquantError` for an empty list or a folder
    without ``results.json``.
    """
    if not run_dirs:
        raise LrquantError("no run directory given")
    runs = load_runs(run_dirs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LrquantError(f"report --output {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (PLOT_PPL, PLOT_BLOCK_LOSS, PLOT_EPOCH_LOSS, PLOT_BLOCK_ERR, PLOT_LAYER_ERR):
        (out_dir / stale).unlink(missing_ok=True)
    doc = build_report(runs, out_dir)
    md = out_dir / "report.md"
    atomic_write_text(md, render_markdown(doc))
    atomic_write_text(out_dir / "report.html", render_html(doc, "lrquant report"))
    return md
