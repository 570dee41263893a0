"""The fast path, written once over three graph primitives (vision, decode, heads).

Per call: each distinct image goes through the vision encoder once; the token prefix
that every sequence shares (the system prompt) is decoded once; on top of it each source's
prefix (its image, shared by all edits of that source in the call); then each triple's prefix
shared by its two rubric passes; then each rubric suffix up to ``<|Reward|>`` (nothing after it
can reach the reward position under causal attention). Every level is one padded batch.
A source's prefix can also be decoded once and kept (``encode_prefix``) for the next calls that
score edits of it. The result equals two full passes per triple to float round-off.
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


@dataclass
class SharedPrefix:
    """One source's decoded prefix (the system prompt and the source image), kept across calls so
    that the chunks of a large group of edits neither encode the source nor decode its prefix again."""

    source_key: str
    embeds: np.ndarray  # the source's merged embeddings [n_tokens, H], row 0 of every call's table
    keyed: np.ndarray  # [2, P]: the prefix's token ids and table rows
    cache: Any  # one cache row of P positions
    mask: np.ndarray  # [1, P]


def _shared(keyed: list[np.ndarray], floor: int = 0) -> int:
    """Positions every sequence of ``keyed`` ([2, L] each: ids and rows) shares, at least ``floor``;
    each sequence keeps at least its last (reward) token for the levels below."""
    cut = min(common_prefix(keyed[0].T.ravel(), k.T.ravel()) // 2 for k in keyed)
    return max(floor, min(cut, min(k.shape[1] for k in keyed) - 1))


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

    def encode_prefix(self, triples: list[PreparedTriple]) -> SharedPrefix:
        """The prefix every triple of one source shares, up to (not into) its edited image."""
        if len({t.source_key for t in triples}) != 1:
            raise ValueError("a shared prefix is made from triples of one source")
        t0 = self.clock()
        key = triples[0].source_key
        embeds = self.encode_images({key: triples[0].source})[key]
        self.times.vision += self.clock() - t0
        t1 = self.clock()
        n_src = len(embeds)  # edited rows start here, so the first row >= n_src is an edited image
        keyed = [np.stack(self._rows(p, 0, n_src)) for t in triples for p in t.prompts]
        first_edit = min(int(np.argmax(k[1] >= n_src)) if (k[1] >= n_src).any() else k.shape[1] for k in keyed)
        cut = min(_shared(keyed), first_edit)
        if cut == 0:
            raise RuntimeError("sequences share no prefix; the chat template must start with text")
        root = keyed[0][:, :cut]
        _, cache, mask = self._level([(root[0], root[1])], np.zeros(1, np.int64), self.graphs.empty_cache(1),
                                     np.zeros((1, 0), dtype=np.int64), embeds)
        self.times.prefix += self.clock() - t1
        return SharedPrefix(key, embeds, root, cache, mask)

    def run(self, triples: list[PreparedTriple], prefix: SharedPrefix | None = None) -> np.ndarray:
        """-> per-head outputs [T, K, 2] (mu, log_sigma). With ``prefix`` (from ``encode_prefix``),
        every triple must be of its source, and the prefix's source and positions are not redone."""
        t0 = self.clock()
        embeds = {}
        if prefix is not None:
            if any(t.source_key != prefix.source_key for t in triples):
                raise ValueError("a shared prefix serves triples of its own source only")
            embeds[prefix.source_key] = prefix.embeds
        images = {}
        for t in triples:
            images.setdefault(t.source_key, t.source)
            images.setdefault(t.edited_key, t.edited)
        embeds.update(self.encode_images({k: v for k, v in images.items() if k not in embeds}))
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
        group_ids = {}
        group = np.array([group_ids.setdefault(t.source_key, len(group_ids)) for t in triples], dtype=np.int64)
        hidden = self._decode_levels(seqs, np.asarray(owner), group, table, prefix)
        t2 = self.clock()
        k = len(triples[0].prompts)
        out = self.graphs.heads(hidden.reshape(len(triples), k, -1))
        self.times.heads += self.clock() - t2
        return np.asarray(out, dtype=np.float32)

    def _rows(self, prompt: Prompt, src_offset: int, edit_offset: int) -> tuple[np.ndarray, np.ndarray]:
        ids = prompt.scored_ids
        return ids, self.family.image_rows(ids, self.spec, src_offset, edit_offset)

    def _root(self, seqs, keyed, table, prefix: SharedPrefix | None):
        """The prefix all sequences share -> (its length, its one-row cache and mask)."""
        if prefix is not None:
            n = prefix.keyed.shape[1]
            if any(k.shape[1] <= n or not np.array_equal(k[:, :n], prefix.keyed) for k in keyed):
                raise ValueError("the triples do not continue the shared prefix")
            return n, prefix.cache, prefix.mask
        common = _shared(keyed)
        if common == 0:
            raise RuntimeError("sequences share no prefix; the chat template must start with text")
        empty, no_mask = self.graphs.empty_cache(1), np.zeros((1, 0), dtype=np.int64)
        _, cache, mask = self._level([(seqs[0][0][:common], seqs[0][1][:common])], np.zeros(1, np.int64), empty, no_mask,
                                     table)
        return common, cache, mask

    def _decode_levels(self, seqs, owner, group, table, prefix) -> np.ndarray:
        """Decode, each level one padded batch continuing the one above: the prefix all sequences
        share, each source group's prefix (its source image), each triple's prefix (its edited
        image, shared by its rubric passes), then the suffixes; -> hidden at each <|Reward|> [2T, H]."""
        keyed = [np.stack([ids, rows]) for ids, rows in seqs]  # [2, L]: equal columns mean identical inputs
        t0 = self.clock()
        root, cache, mask = self._root(seqs, keyed, table, prefix)
        n_triples = len(group)
        firsts = [int(np.flatnonzero(owner == ti)[0]) for ti in range(n_triples)]
        group_cut = [_shared([keyed[s] for s in np.flatnonzero(group[owner] == g)], root) for g in range(group.max() + 1)]
        triple_cut = [_shared([keyed[s] for s in np.flatnonzero(owner == ti)], group_cut[group[ti]])
                      for ti in range(n_triples)]
        # Each triple's row in the current cache, level by level.
        row = np.zeros(n_triples, dtype=np.int64)
        group_firsts = [firsts[int(np.flatnonzero(group == g)[0])] for g in range(len(group_cut))]
        segments = [(seqs[s][0][root:cut], seqs[s][1][root:cut]) for s, cut in zip(group_firsts, group_cut)]
        if any(len(ids) for ids, _ in segments):
            _, cache, mask = self._level(segments, np.zeros(len(segments), np.int64), cache, mask, table)
            row = group.copy()
        segments = [(seqs[s][0][group_cut[group[ti]]:triple_cut[ti]], seqs[s][1][group_cut[group[ti]]:triple_cut[ti]])
                    for ti, s in enumerate(firsts)]
        if any(len(ids) for ids, _ in segments):
            _, cache, mask = self._level(segments, row, cache, mask, table)
            row = np.arange(n_triples, dtype=np.int64)
        t1 = self.clock()
        self.times.prefix += t1 - t0
        suffixes = [(ids[triple_cut[o]:], rows[triple_cut[o]:]) for (ids, rows), o in zip(seqs, owner)]
        hidden, _, _ = self._level(suffixes, row[owner], cache, mask, table)
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


class PipelineBackend:
    """A backend on the fast path: ``head_outputs`` and a source prefix kept across calls."""

    pipeline: FastPipeline

    def head_outputs(self, triples: list[PreparedTriple], prefix: SharedPrefix | None = None) -> np.ndarray:
        return self.pipeline.run(triples, prefix)

    def encode_prefix(self, triples: list[PreparedTriple]) -> SharedPrefix | None:
        return self.pipeline.encode_prefix(triples)


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
