"""The fast path, written once over three graph primitives (vision, decode, heads).

Per call: each distinct image goes through the vision encoder once; the token prefix
that every sequence shares (system prompt, and the source image when ranking edits of
one source) is decoded once; each triple's prefix shared by its two rubric passes is
decoded once on top of it; then each rubric suffix up to ``<|Reward|>`` (nothing after it
can reach the reward position under causal attention). Every level is one padded batch.
The result equals two full passes per triple to float round-off.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .families import family
from .preprocess import PreprocessedImage
from .prompts import Prompt


class GraphRunner(Protocol):
    """What a backend provides to run the fast path: its three graphs (vision, decoder, heads). Caches are opaque to the pipeline; the
    vision inputs are whatever the model family's ``vision_feeds`` makes, in its graph's order."""

    spec: object  # the family's ModelSpec

    def vision(self, *inputs: np.ndarray) -> np.ndarray: ...

    def decode(self, input_ids: np.ndarray, image_embeds: np.ndarray, image_index: np.ndarray,
               position_ids: np.ndarray, attention_mask: np.ndarray, past: Any) -> tuple[np.ndarray, Any]: ...

    def heads(self, hidden: np.ndarray) -> np.ndarray: ...

    def empty_cache(self, batch: int = 1) -> Any: ...

    def select(self, cache: Any, rows: np.ndarray) -> Any: ...


@dataclass
class PreparedTriple:
    """A triple after preprocessing and prompt assembly: all the pipeline needs."""

    source: PreprocessedImage
    edited: PreprocessedImage
    prompts: list[Prompt]
    source_key: str = field(init=False)
    edited_key: str = field(init=False)

    def __post_init__(self):
        self.source_key, self.edited_key = image_key(self.source), image_key(self.edited)


def image_key(image: PreprocessedImage) -> str:
    digest = hashlib.blake2b(image.pixel_values.tobytes(), digest_size=16)
    digest.update(repr(image.grid_thw).encode())
    return digest.hexdigest()


@dataclass
class StageTimes:
    vision: float = 0.0
    prefix: float = 0.0
    suffixes: float = 0.0
    heads: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class FastPipeline:
    def __init__(self, graphs: GraphRunner, clock=None):
        import time

        self.graphs = graphs
        self.spec = graphs.spec
        self.family = family(graphs.spec.family)
        self.clock = clock or time.perf_counter
        self.times = StageTimes()

    def encode_images(self, images: dict[str, PreprocessedImage]) -> dict[str, np.ndarray]:
        """Each distinct image once -> merged embeddings [n_tokens, H] in the processor's order."""
        out = {}
        for key, image in images.items():
            feeds, order = self.family.vision_feeds(image, self.spec)
            out[key] = np.asarray(self.graphs.vision(*feeds), dtype=np.float32)[order]
        return out

    def run(self, triples: list[PreparedTriple]) -> np.ndarray:
        """-> per-head outputs [T, K, 2] (mu, log_sigma)."""
        t0 = self.clock()
        images = {}
        for t in triples:
            images.setdefault(t.source_key, t.source)
            images.setdefault(t.edited_key, t.edited)
        embeds = self.encode_images(images)
        t1 = self.clock()
        self.times.vision += t1 - t0

        # One embedding table per call; each sequence position points at a row of it or at -1 (text).
        keys = list(embeds)
        offsets = dict(zip(keys, np.cumsum([0] + [len(embeds[k]) for k in keys[:-1]])))
        table = np.concatenate([embeds[k] for k in keys]) if keys else np.zeros((0, self.spec.text.hidden_size), np.float32)
        seqs, owner = [], []
        for ti, t in enumerate(triples):
            for prompt in t.prompts:
                seqs.append(self._rows(prompt, offsets[t.source_key], offsets[t.edited_key]))
                owner.append(ti)
        hidden = self._decode_levels(seqs, owner, len(triples), table)
        t2 = self.clock()
        k = len(triples[0].prompts)
        out = self.graphs.heads(hidden.reshape(len(triples), k, -1))
        self.times.heads += self.clock() - t2
        return np.asarray(out, dtype=np.float32)

    def _rows(self, prompt: Prompt, src_offset: int, edit_offset: int) -> tuple[np.ndarray, np.ndarray]:
        ids = prompt.scored_ids
        return ids, self.family.image_rows(ids, self.spec, src_offset, edit_offset)

    def _decode_levels(self, seqs, owner, n_triples, table) -> np.ndarray:
        """Decode shared prefix, per-triple prefixes and suffixes; -> hidden at each <|Reward|> [2T, H]."""
        keyed = [np.stack([ids, rows]) for ids, rows in seqs]  # [2, L]: equal columns mean identical inputs
        last = min(k.shape[1] for k in keyed) - 1  # every sequence keeps at least its reward token
        common = min(common_prefix(keyed[0].T.ravel(), k.T.ravel()) // 2 for k in keyed)
        common = min(common, last)
        if common == 0:
            raise RuntimeError("sequences share no prefix; the chat template must start with text")
        per_triple = [common] * n_triples
        for ti in range(n_triples):
            mine = [k for k, o in zip(keyed, owner) if o == ti]
            cut = min(common_prefix(mine[0].T.ravel(), m.T.ravel()) // 2 for m in mine)
            per_triple[ti] = max(common, min(cut, min(m.shape[1] for m in mine) - 1))

        t0 = self.clock()
        cache, mask = self.graphs.empty_cache(1), np.zeros((1, 0), dtype=np.int64)
        _, cache, mask = self._level([(seqs[0][0][:common], seqs[0][1][:common])], np.zeros(1, np.int64), cache, mask, table)
        firsts = [owner.index(ti) for ti in range(n_triples)]
        segments = [(seqs[s][0][common:per_triple[ti]], seqs[s][1][common:per_triple[ti]]) for ti, s in enumerate(firsts)]
        if any(len(ids) for ids, _ in segments):
            _, cache, mask = self._level(segments, np.zeros(n_triples, np.int64), cache, mask, table)
            parents = np.asarray(owner, dtype=np.int64)
        else:
            parents = np.zeros(len(seqs), dtype=np.int64)
        t1 = self.clock()
        self.times.prefix += t1 - t0
        suffixes = [(ids[per_triple[o]:], rows[per_triple[o]:]) for (ids, rows), o in zip(seqs, owner)]
        hidden, _, _ = self._level(suffixes, parents, cache, mask, table)
        lengths = np.array([len(ids) for ids, _ in suffixes])
        self.times.suffixes += self.clock() - t1
        return hidden[np.arange(len(seqs)), lengths - 1]

    def _level(self, segments, parents, cache, past_mask, table):
        """Decode one padded batch of segments, row b continuing past row ``parents[b]``."""
        b, s = len(segments), max(len(ids) for ids, _ in segments)
        p = past_mask.shape[1]
        ids = np.full((b, s), self.spec.tokens.pad, dtype=np.int64)
        rows = np.full((b, s), -1, dtype=np.int64)
        mask = np.zeros((b, p + s), dtype=np.int64)
        mask[:, :p] = past_mask[parents]
        start = past_mask.sum(1)[parents]
        positions = start[:, None] + np.arange(s)[None, :]
        for i, (seg_ids, seg_rows) in enumerate(segments):
            ids[i, : len(seg_ids)], rows[i, : len(seg_rows)] = seg_ids, seg_rows
            mask[i, p : p + len(seg_ids)] = 1
        used = np.unique(rows[rows >= 0])
        local = np.where(rows >= 0, np.searchsorted(used, rows), -1)
        # Gather needs one row even when no image token is in this level.
        sub = table[used] if len(used) else np.zeros((1, table.shape[1]), dtype=np.float32)
        past = self.graphs.select(cache, parents) if p else self.graphs.empty_cache(b)
        hidden, present = self.graphs.decode(ids, sub, local, positions, mask, past)
        return hidden, present, mask


def fuse(per_head: np.ndarray, strategy: str) -> np.ndarray:
    """[T, K, 2] per-head (mu, log_sigma) -> [T, 2], as the reference's pooling_strategy."""
    per_head = per_head.astype(np.float32)
    if strategy == "mean":
        return per_head.mean(axis=1)
    if strategy == "min":
        return per_head.min(axis=1)
    if strategy == "sum":
        mu = per_head[:, :, 0].sum(axis=1)
        sigma = np.sqrt((np.exp(per_head[:, :, 1]) ** 2).sum(axis=1))
        return np.stack([mu, np.log(sigma)], axis=-1)
    raise ValueError(f"unknown fusion {strategy!r}")
