"""python benchmarks/report.py RESULTS.json [...] --out DIR: a markdown table per results file
and PNG plots (latency vs batch size per variant; variant mu against reference mu)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import validate_document


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
        lines.append(f"| {_short(r['variant'])} | {r['backend'].get('backend')} {r['backend'].get('precision') or r['backend'].get('dtype', '')} "
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


def environment_line(doc: dict) -> str:
    env = doc["environment"]
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return f"{env['cpu']} ({env['cpu_count']} cores){gpu}; {libs}. Command: `{doc['command']}`"


def plots(doc: dict, out: Path, stem: str) -> list[Path]:
    from editreward_rt.extras import require

    require("matplotlib", "bench", "plots", error=SystemExit).use("Agg")
    plt = require("matplotlib.pyplot", "bench", "plots", error=SystemExit)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    if doc["kind"] == "latency":
        for r in doc["results"]:
            if r["status"] == "ok":
                per = r["throughput"]["per_batch"]
                sizes = sorted(int(k) for k in per)
                ax.plot(sizes, [per[str(s)]["latency_ms"] for s in sizes], marker="o", label=_short(r["variant"]))
        ax.set(xlabel="batch size (triples)", ylabel="latency per batch (ms)", xscale="log", title="Latency vs batch size")
    else:
        for r in doc["results"]:
            if r["status"] != "reference":
                ax.scatter(r["scores"]["mu_reference"], r["scores"]["mu"], s=12, label=_short(r["variant"]))
        lo = min(min(r["scores"]["mu_reference"]) for r in doc["results"])
        hi = max(max(r["scores"]["mu_reference"]) for r in doc["results"])
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        ax.set(xlabel="reference mu", ylabel="variant mu", title="mu: variant vs reference")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def render(paths: list[Path], out: Path, with_plots: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for path in paths:
        doc = json.loads(path.read_text(encoding="utf-8"))
        validate_document(doc)
        body = latency_table(doc) + "\n\nRanking N edits of one source:\n\n" + scaling_table(doc) if doc["kind"] == "latency" else parity_table(doc)
        sections.append(f"### {doc['kind'].capitalize()}: {path.name}\n\n{environment_line(doc)}\n\n{body}\n")
        if with_plots:
            for png in plots(doc, out, path.stem):
                sections.append(f"![{png.stem}]({png.name})\n")
    report = out / "report.md"
    report.write_text("\n".join(sections), encoding="utf-8")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/report"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    print(render(args.results, args.out, with_plots=not args.no_plots))
    return 0
