"""python benchmarks/parity.py: score the same triples with the PyTorch reference and each
variant; report drift, rank correlation, pairwise preference agreement and, where the data
has human labels, the upstream evaluation's accuracies.

Inputs (one of): generated triples (default), ``--triples`` JSONL of {instruction, source,
edited}, ``--examples`` a JSON list of the same (the project's example-set format), or
``--bench DIR`` a local copy of EditReward-Bench (``*pair.json``: prompt, path_src,
paths_generated, human_vote.ranking). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from editreward_rt.errors import EditRewardError
from editreward_rt.jsonl import is_blank, parse_triple, read_lines
from editreward_rt.tolerances import tolerance

from . import rank_metrics as metrics
from .common import REFERENCE, Variant, add_model_args, resolve_model_args, results_document, synthetic_groups, write_document


@dataclass
class Group:
    """Edits of one source under one instruction, with the human ranking where known."""

    instruction: str
    source: object
    edits: list
    order: list[int] | None = None
    tie: bool = False
    labelled: bool = False
    name: str = ""


@dataclass
class Scored:
    per_head: np.ndarray  # [n_triples, K, 2]
    groups: list[list[int]] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def load_triples(path: Path, is_jsonl: bool) -> list[Group]:
    if is_jsonl:
        records = [parse_triple(line) for line in read_lines(path) if not is_blank(line)]
    else:
        records = json.loads(path.read_text(encoding="utf-8"))
    groups: dict[tuple, Group] = {}
    for r in records:
        key = (r["instruction"], r["source"])
        groups.setdefault(key, Group(r["instruction"], path.parent / r["source"], [], name=r["source"]))
        groups[key].edits.append(path.parent / r["edited"])
    return list(groups.values())


def load_bench(folder: Path) -> list[Group]:
    groups = []
    for path in sorted(folder.glob("*pair*.json")):
        for item in json.loads(path.read_text(encoding="utf-8")):
            edits = [folder / p for p in item["paths_generated"]]
            order, tie = metrics.parse_ranking(item.get("human_vote", {}).get("ranking", ""), len(edits))
            groups.append(Group(item["prompt"], folder / item["path_src"], edits, order, tie, True, path.stem))
    if not groups:
        raise SystemExit(f"no EditReward-Bench files (*pair*.json) in {folder}")
    return groups


def score_groups(scorer, groups: list[Group]) -> Scored:
    rows, index, errors = [], [], []
    for g, group in enumerate(groups):
        try:
            prepared = [scorer.prepare(group.instruction, group.source, e) for e in group.edits]
        except EditRewardError as exc:  # the same input fails for every variant: skip the group
            errors.append({"group": g, **exc.to_dict()})
            index.append([])
            continue
        start = sum(len(r) for r in rows)
        rows.append(scorer.backend.head_outputs(prepared))
        index.append(list(range(start, start + len(prepared))))
    per_head = np.concatenate(rows) if rows else np.zeros((0, 2, 2), np.float32)
    return Scored(per_head, index, errors)


def _drift(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"max_abs_diff": float(d.max()) if d.size else 0.0, "mean_abs_diff": float(d.mean()) if d.size else 0.0}


def human_metrics(groups: list[Group], scored: Scored, mu: np.ndarray) -> dict | None:
    labelled = [(g, idx) for g, idx in zip(groups, scored.groups) if g.labelled and idx]
    if not labelled:
        return None
    human, model = [], []
    for g, idx in labelled:
        for a, b in metrics.group_pairs([list(range(len(idx)))]):
            label = metrics.human_pair_label(g.order, g.tie, a, b)
            if label is not None:
                human.append(label)
                model.append(mu[idx[a]] - mu[idx[b]])
    acc, eps = metrics.accuracy_with_ties(human, model)
    return {"pairs": len(human), "accuracy_with_ties": acc, "tie_threshold": eps,
            "accuracy_without_ties": metrics.accuracy_without_ties(human, model),
            "strict_group_accuracy": metrics.strict_group_accuracy([g.order for g, _ in labelled],
                                                                   [mu[idx] for _, idx in labelled])}


def compare(label: str, scorer, reference: Scored, scored: Scored, groups, fusion: str, names) -> dict:
    from editreward_rt.pipeline import fuse

    ref_fused, var_fused = fuse(reference.per_head, fusion), fuse(scored.per_head, fusion)
    pairs = metrics.group_pairs([g for g in scored.groups if g])
    result = {"variant": label, "backend": scorer.description, "n_triples": int(len(var_fused)),
              "mu": _drift(var_fused[:, 0], ref_fused[:, 0]), "log_sigma": _drift(var_fused[:, 1], ref_fused[:, 1]),
              "heads": [{"name": n, "mu": _drift(scored.per_head[:, k, 0], reference.per_head[:, k, 0]),
                         "log_sigma": _drift(scored.per_head[:, k, 1], reference.per_head[:, k, 1])}
                        for k, n in enumerate(names)],
              "spearman": metrics.spearman(ref_fused[:, 0], var_fused[:, 0]),
              "kendall": metrics.kendall_tau_b(ref_fused[:, 0], var_fused[:, 0]),
              "pairwise_agreement": metrics.preference_agreement(ref_fused[:, 0], var_fused[:, 0], pairs),
              "n_pairs": len(pairs), "human": human_metrics(groups, scored, var_fused[:, 0]),
              "scores": {"mu": var_fused[:, 0].tolist(), "mu_reference": ref_fused[:, 0].tolist()},
              "input_errors": scored.errors}
    if label == REFERENCE:
        result["status"] = "reference"
        return result
    tol = tolerance(*Variant(label).tolerance_key(scorer))
    worst_head = max(max(h["mu"]["max_abs_diff"], h["log_sigma"]["max_abs_diff"]) for h in result["heads"])
    ok = (result["mu"]["max_abs_diff"] <= tol.mu and result["log_sigma"]["max_abs_diff"] <= tol.log_sigma
          and worst_head <= max(tol.mu, tol.log_sigma)
          and (np.isnan(result["pairwise_agreement"]) or result["pairwise_agreement"] >= tol.agreement))
    result["tolerance"] = {"mu": tol.mu, "log_sigma": tol.log_sigma, "agreement": tol.agreement}
    result["status"] = "ok" if ok else "failed-parity"
    return result


def load_groups(args) -> list[Group]:
    if args.bench:
        return load_bench(Path(args.bench))
    if args.triples:
        return load_triples(Path(args.triples), is_jsonl=True)
    if args.examples:
        return load_triples(Path(args.examples), is_jsonl=False)
    return [Group(i, s, list(e)) for i, s, e in synthetic_groups(args.groups, args.edits, seed=args.seed)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, out="results/parity.json")
    parser.add_argument("--triples", help="JSONL of {instruction, source, edited}")
    parser.add_argument("--examples", help="JSON list of {instruction, source, edited}")
    parser.add_argument("--bench", help="local EditReward-Bench folder")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--edits", type=int, default=4)
    args = parser.parse_args(argv)
    resolve_model_args(args)
    groups = load_groups(args)
    labels = [REFERENCE] + [v for v in args.variant if v != REFERENCE]
    results, reference = [], None
    for i, label in enumerate(labels, start=1):
        print(f"[{i}/{len(labels)}] scoring {sum(len(g.edits) for g in groups)} triples with {label}", file=sys.stderr, flush=True)
        scorer = Variant(label).load(args.ckpt, args.base, args.prompts_from, args.device, args.threads)
        scored = score_groups(scorer, groups)
        reference = reference or scored
        results.append(compare(label, scorer, reference, scored, groups, scorer.spec.heads.fusion, scorer.spec.heads.names))
    config = {"ckpt": args.ckpt, "prompts_from": args.prompts_from, "groups": len(groups),
              "data": args.bench or args.triples or args.examples or "generated"}
    path = write_document(results_document("parity", config, results, args.device), args.out)
    for r in results:
        print(f"{r['variant']:<40} {r['status']:<14} max|dmu| {r['mu']['max_abs_diff']:.2e}  spearman {r['spearman']:.4f}  "
              f"pairwise agreement {r['pairwise_agreement']:.3f}")
    print(f"wrote {path}")
    return 0 if all(r["status"] in ("ok", "reference") for r in results) else 1
