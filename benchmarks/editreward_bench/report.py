"""python benchmarks/report.py RESULTS.json [...] [--page docs/performance.md]: the tables and plots
of latency.py, parity.py and cpu_speed.py results, written into a markdown page between markers
(one block per results file, ``<!-- report.py: begin STEM -->`` ... ``end STEM``; the prose around
them is left alone; a file without a block yet is appended) and the plots into ``img/`` beside it.

Plots show throughput (triples/s), not latency per batch: against triples per call and against
threads, one line per variant (engine and precision), the speed-up over the reference and the share
of the float32 GEMM peak; the machine, model and dtype are in the title; the axes have integer ticks.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .common import REFERENCE, validate_document
from .cpu_speed import table as cpu_speed_table

PAGE = Path("docs/performance.md")  # relative to the repository root, where cpu_suite.sh runs


def _short(label: str) -> str:
    """``model:some/dir/small-ort-int8`` -> ``small-ort-int8``."""
    prefix, sep, path = label.partition(":")
    return Path(path).name if sep and prefix in ("model", "onnx") else label


def latency_table(doc: dict) -> str:
    head = ("| variant | backend | p50 ms | p90 ms | p99 ms | best triples/s (batch) | x reference | "
            "preprocess / vision / prefix / suffixes / heads ms | peak RSS MB | peak GPU MB | status |")
    lines = [head, "|" + "---|" * 11]
    for r in doc["results"]:
        if r["status"] != "ok":
            lines.append(f"| {_short(r['variant'])} | | | | | | | | | | {r['status']} |")
            continue
        s = r["stages"]
        stages = " / ".join(f"{s.get(k + '_ms', float('nan')):.0f}" if k + "_ms" in s else "-"
                            for k in ("preprocess", "vision", "prefix", "suffixes", "heads"))
        b, t = r["batch1"], r["throughput"]
        gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "-"
        d = r["backend"]
        lines.append(f"| {_short(r['variant'])} | {d.get('backend')} {d.get('quantization') or d.get('precision') or d.get('dtype', '')} "
                     f"| {b['p50_ms']:.0f} | {b['p90_ms']:.0f} | {b['p99_ms']:.0f} | {t['best_triples_per_s']:.2f} ({t['best_batch']}) "
                     f"| {r['vs_reference']['throughput_ratio']:.2f} | {stages} | {r['peak_rss_mb']:.0f} | {gpu} | ok |")
    return "\n".join(lines)


def scaling_table(doc: dict) -> str:
    counts = sorted({row["edits"] for r in doc["results"] if r["status"] == "ok" for row in r["scaling"]})
    lines = ["| variant | " + " | ".join(f"{n} edits ms" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for r in doc["results"]:
        if r["status"] == "ok":
            by = {row["edits"]: row["latency_ms"] for row in r["scaling"]}
            lines.append(f"| {_short(r['variant'])} | " + " | ".join(f"{by[n]:.0f}" if n in by else "-" for n in counts) + " |")
    return "\n".join(lines)


def parity_table(doc: dict) -> str:
    lines = ["| variant | status | max abs d mu | mean abs d mu | max abs d log_sigma | Spearman | Kendall | pairwise agreement | human acc (ties) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        human = r.get("human") or {}
        acc = f"{human['accuracy_with_ties']:.3f}" if human else "-"
        lines.append(f"| {_short(r['variant'])} | {r['status']} | {r['mu']['max_abs_diff']:.2e} | {r['mu']['mean_abs_diff']:.2e} "
                     f"| {r['log_sigma']['max_abs_diff']:.2e} | {r['spearman']:.4f} | {r['kendall']:.4f} "
                     f"| {r['pairwise_agreement']:.3f} | {acc} |")
    return "\n".join(lines)


def cpu_speed_tables(doc: dict) -> str:
    """cpu_speed.py's block for each thread count, from the rows it stored for that count: the CPU
    and its matrix units, the GEMM peaks, the table."""
    blocks = []
    for threads, peaks in sorted(doc["config"]["gemm_peaks"].items(), key=lambda kv: int(kv[0])):
        rows = [r for r in doc["results"] if r.get("threads") == int(threads)]
        blocks.append(cpu_speed_table(rows, peaks, doc["config"].get("cpu")))
    return "\n\n".join(blocks)


def environment_line(doc: dict) -> str:
    env = doc["environment"]
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return f"{env['cpu']} ({env['cpu_count']} cores){gpu}; {libs}. Command: `{doc['command']}`"


def _model_name(config: dict) -> str:
    """What was measured, for a title: the hub id or folder name; a generated fixture's checkpoint
    sits in ``fixture-SIZE/checkpoint`` (common.ensure_fixture), so its parent names the size."""
    ckpt = Path(str(config.get("ckpt") or "?"))
    return ckpt.parent.name if ckpt.name == "checkpoint" else str(ckpt)


def title(doc: dict) -> str:
    """The machine, the model and the dtype, for every plot of ``doc``."""
    env = doc["environment"]
    machine = f"{env['cpu']}, {env['cpu_count']} cores" + (f", {env['gpu']}" if env.get("gpu") else "")
    # cpu_speed.py runs every variant and the reference in float32 and records no dtype of its own.
    dtype = doc["config"].get("dtype") or "float32"
    return f"{machine}\nmodel {_model_name(doc['config'])}, reference and torch variants in {dtype}"


def _engine(row: dict) -> str:
    """``onnx-fp32 (onnxruntime float32)``: the variant with its engine and precision."""
    d = row.get("backend") or {}
    engine = " ".join(x for x in (d.get("backend", "?"), d.get("quantization") or d.get("precision") or d.get("dtype")) if x)
    return f"{row.get('label') or _short(row['variant'])} ({engine})"


def _integer_axis(axis, values) -> None:
    """Ticks at the measured values, printed as plain integers (no log-scale 2x10^0 labels)."""
    from matplotlib.ticker import NullLocator

    values = sorted(set(int(v) for v in values))
    axis.set_ticks(values, labels=[str(v) for v in values])
    axis.set_minor_locator(NullLocator())


def _pyplot():
    from editreward_rt.extras import require

    require("matplotlib", "bench", "plots", error=SystemExit).use("Agg")
    return require("matplotlib.pyplot", "bench", "plots", error=SystemExit)


def latency_plot(plt, doc: dict):
    """Triples/s against triples per call, and the speed-up over the reference's best triples/s."""
    rows = [r for r in doc["results"] if r["status"] == "ok"]
    reference = next((r for r in rows if r["variant"] == REFERENCE), None)
    fig, (tput, speedup) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = set()
    for r in rows:
        per = r["throughput"]["per_batch"]
        x = sorted(int(k) for k in per)
        y = [per[str(s)]["triples_per_s"] for s in x]
        sizes.update(x)
        line, = tput.plot(x, y, marker="o", label=_engine(r))
        if reference is not None:
            best = reference["throughput"]["best_triples_per_s"]
            speedup.plot(x, [v / best for v in y], marker="o", color=line.get_color())
    tput.set(xlabel="triples per call", ylabel="triples/s", title="Throughput")
    speedup.set(xlabel="triples per call", ylabel="x the reference's best triples/s", title="Speed-up over the reference")
    speedup.axhline(1.0, color="grey", linewidth=0.8)
    for ax in (tput, speedup):
        _integer_axis(ax.xaxis, sizes)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    tput.legend(fontsize=7)
    fig.suptitle(title(doc), fontsize=9)
    return fig


def threads_plot(plt, doc: dict):
    """cpu_speed.py, one triple per call: triples/s, speed-up over the reference and % of the
    float32 GEMM peak, each against threads."""
    rows = [r for r in doc["results"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("Throughput", "triples/s (1 per call)", lambda r: r["triples_per_s"]["1"]),
              ("Speed-up over the reference", "x reference (1 per call)", lambda r: r["vs_reference"]["1"]),
              ("Share of the machine's peak", "% of float32 GEMM peak", lambda r: r.get("pct_of_float32_peak")))
    threads = sorted({r["threads"] for r in rows})
    for label in dict.fromkeys(r["variant"] for r in rows):  # in run order, each once
        mine = sorted((r for r in rows if r["variant"] == label), key=lambda r: r["threads"])
        for ax, (_, _, value) in zip(axes, panels):
            points = [(r["threads"], value(r)) for r in mine if value(r) is not None]
            ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=_engine(mine[0]))
    for ax, (heading, ylabel, _) in zip(axes, panels):
        ax.set(xlabel="threads", ylabel=ylabel, title=heading)
        _integer_axis(ax.xaxis, threads)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title(doc), fontsize=9)
    return fig


def batch_plot(plt, doc: dict):
    """cpu_speed.py: triples/s against triples per call, one panel per thread count."""
    rows = [r for r in doc["results"] if r["status"] == "ok"]
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4.2), squeeze=False)
    for ax, t in zip(axes[0], threads):
        sizes = set()
        for r in (r for r in rows if r["threads"] == t):
            x = sorted(int(k) for k in r["triples_per_s"])
            sizes.update(x)
            ax.plot(x, [r["triples_per_s"][str(s)] for s in x], marker="o", label=_engine(r))
        ax.set(xlabel="triples per call", ylabel="triples/s", title=f"{t} thread{'s' if t > 1 else ''}")
        _integer_axis(ax.xaxis, sizes)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title(doc), fontsize=9)
    return fig


def parity_plot(plt, doc: dict):
    """Each variant's mu against the reference's, on the diagonal when they agree."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in doc["results"]:
        if r["status"] != "reference":
            ax.scatter(r["scores"]["mu_reference"], r["scores"]["mu"], s=12, label=_short(r["variant"]))
    lo = min(min(r["scores"]["mu_reference"]) for r in doc["results"])
    hi = max(max(r["scores"]["mu_reference"]) for r in doc["results"])
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    ax.set(xlabel="reference mu", ylabel="variant mu", title="mu: variant against reference")
    ax.legend(fontsize=7)
    fig.suptitle(title(doc), fontsize=9)
    return fig


def section(doc: dict, stem: str, img: Path | None) -> str:
    """One results file's block: where it ran, its tables and (with ``img``) its plots."""
    plt = _pyplot() if img is not None else None
    if doc["kind"] == "latency":
        body = latency_table(doc) + "\n\nRanking N edits of one source (ms; the fast path encodes the source and its prefix once):\n\n" + scaling_table(doc)
        plots = [latency_plot] if plt else []
    elif doc["kind"] == "parity":
        body, plots = parity_table(doc), [parity_plot] if plt else []
    elif doc["kind"] == "cpu-speed":
        body, plots = cpu_speed_tables(doc), [threads_plot, batch_plot] if plt else []
    else:
        raise ValueError(f"report.py has no tables for {doc['kind']!r} results ({stem}); it reads latency, parity and cpu-speed")
    images = []
    if plots:
        img.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            png = img / f"{stem}-{plot.__name__.removesuffix('_plot')}.png"
            fig = plot(plt, doc)
            fig.tight_layout()
            fig.savefig(png, dpi=100)  # small enough to keep beside the docs (tens of KB)
            plt.close(fig)
            images.append(f"![{png.stem}]({img.name}/{png.name})")
    return "\n\n".join([f"{environment_line(doc)}", body, *images])


def update_page(page: Path, blocks: dict[str, str]) -> None:
    """Replace each ``stem``'s block between its markers, or append it; nothing else changes."""
    text = page.read_text(encoding="utf-8") if page.is_file() else "# Performance\n"
    for stem, body in blocks.items():
        begin, end = f"<!-- report.py: begin {stem} -->", f"<!-- report.py: end {stem} -->"
        block = f"{begin}\n{body}\n{end}"
        found = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        text, n = found.subn(lambda _: block, text, count=1)
        if n == 0:
            text = text.rstrip("\n") + f"\n\n{block}\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")


def render(paths: list[Path], page: Path = PAGE, with_plots: bool = True) -> Path:
    blocks = {}
    for path in paths:
        doc = json.loads(path.read_text(encoding="utf-8"))
        validate_document(doc)
        blocks[path.stem] = section(doc, path.stem, page.parent / "img" if with_plots else None)
    update_page(page, blocks)
    return page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--page", type=Path, default=PAGE, help="the markdown page to update (default: %(default)s); plots go to img/ beside it")
    parser.add_argument("--out", type=Path, help="a folder to write report.md (and img/) into instead of --page")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    page = args.out / "report.md" if args.out else args.page
    print(render(args.results, page, with_plots=not args.no_plots))
    return 0
