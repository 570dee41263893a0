"""Calibration data: synthetic triples, or a user's JSONL of triples, turned into model inputs
by exactly the preprocessing and prompts used for scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from editreward_rt.schemes import QuantizeError

INSTRUCTIONS = ["Add a red hat to the person", "Make the sky look stormy", "Remove the car on the left",
                "Turn the photo into a pencil sketch", "Replace the dog with a cat", "Change the season to winter",
                "Put a lamp on the table", "Make the water look frozen"]


def synthetic_triples(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Random but structured images (gradients, blocks, noise) and plausible instructions."""
    if n <= 0:
        raise QuantizeError("calibration size must be positive")
    rng = np.random.default_rng(seed)
    triples = []
    for i in range(n):
        h, w = int(rng.integers(240, 900)), int(rng.integers(240, 900))
        yy, xx = np.mgrid[0:h, 0:w]
        source = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * rng.uniform(80, 255, 3)
        source = (source + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        edited = source.copy()
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        edited[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
        triples.append((INSTRUCTIONS[i % len(INSTRUCTIONS)], source, edited))
    return triples


def load_triples(path: str | Path, limit: int | None = None) -> list[tuple[str, Path, Path]]:
    """JSONL of {instruction, source, edited}, paths relative to the file."""
    from editreward_rt.errors import InputError
    from editreward_rt.jsonl import read_triples, resolve

    path = Path(path)
    try:
        records = read_triples(path)
    except InputError as exc:  # missing, unreadable or not a regular file
        raise QuantizeError(f"cannot read calibration file {path}: {exc}") from exc
    triples = []
    for index, record in records:
        if isinstance(record, Exception):
            raise QuantizeError(f"{path}:{index + 1} is not a {{instruction, source, edited}} record: {record}")
        triples.append(resolve(record, path.parent))
        if limit and len(triples) >= limit:
            break
    if not triples:
        raise QuantizeError(f"calibration file {path} holds no triples")
    return triples


def calibration_triples(path: str | Path | None, size: int, seed: int = 0) -> list:
    return load_triples(path, limit=size) if path else synthetic_triples(size, seed)


def prepare_all(scorer, triples) -> list:
    """PreparedTriples for calibration; a triple that cannot be read stops with its reason."""
    from editreward_rt.errors import EditRewardError

    prepared = []
    for i, triple in enumerate(triples):
        try:
            prepared.append(scorer.prepare(*triple))
        except EditRewardError as exc:
            raise QuantizeError(f"calibration triple {i} is unusable: {exc}") from exc
    return prepared
