"""Agreement metrics: numeric drift, rank correlation, pairwise preference, and the upstream
evaluation's accuracy against human labels (with calibrated ties, after arXiv 2305.14324)."""

from __future__ import annotations

import itertools

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall_tau_b(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da == db:
            concordant += 1
        else:
            discordant += 1
    denom = np.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return float((concordant - discordant) / denom) if denom else float("nan")


def group_pairs(groups: list[list[int]]) -> list[tuple[int, int]]:
    """All index pairs within each group of triples sharing a source."""
    return [p for g in groups for p in itertools.combinations(g, 2)]


def preference_agreement(mu_ref, mu_var, pairs) -> float:
    if not pairs:
        return float("nan")
    same = [np.sign(mu_ref[i] - mu_ref[j]) == np.sign(mu_var[i] - mu_var[j]) for i, j in pairs]
    return float(np.mean(same))


def _stats(human, model, eps):
    """(consistent + both-tie) / all, with |model difference| <= eps read as a model tie."""
    human, model = np.asarray(human), np.asarray(model)
    model_tie = np.abs(model) <= eps
    both_tie = (human == 0) & model_tie
    consistent = (human != 0) & ~model_tie & (np.sign(human) == np.sign(model))
    return float((consistent.sum() + both_tie.sum()) / len(human))


def accuracy_with_ties(human, model) -> tuple[float, float]:
    """Best accuracy over tie thresholds, and that threshold. human: +1/-1/0; model: score differences."""
    if len(human) == 0:
        return float("nan"), 0.0
    thresholds = [0.0] + sorted(set(np.abs(np.asarray(model, np.float64)).tolist()))
    best = max(((_stats(human, model, eps), eps) for eps in thresholds), key=lambda t: t[0])
    return best


def accuracy_without_ties(human, model) -> float:
    human, model = np.asarray(human), np.asarray(model)
    keep = human != 0
    if not keep.any():
        return float("nan")
    return float(np.mean(np.sign(human[keep]) == np.sign(model[keep])))


def parse_ranking(ranking: str, n: int) -> tuple[list[int] | None, bool]:
    """'C>A>B' -> ([2, 0, 1], False); 'A=B=Good' -> (None, True) (a tie); malformed -> (None, False)."""
    if ranking in ("A=B=Good", "A=B=Bad"):
        return None, True
    if ranking in ("B>A", "A<B"):
        return [1, 0], False
    letters = ranking.replace(">", "")
    if "=" in ranking or "<" in ranking or len(letters) != n or sorted(letters) != [chr(65 + i) for i in range(n)]:
        return None, False
    return [ord(c) - 65 for c in letters], False


def human_pair_label(order: list[int] | None, tie: bool, i: int, j: int) -> int | None:
    if tie:
        return 0
    if order is None:
        return None
    return 1 if order.index(i) < order.index(j) else -1


def strict_group_accuracy(orders: list[list[int] | None], scores: list[np.ndarray]) -> float:
    """Fraction of groups whose full human ranking the model reproduces exactly."""
    hits = [list(np.argsort(-s, kind="mergesort")) == o for o, s in zip(orders, scores) if o is not None]
    return float(np.mean(hits)) if hits else float("nan")
