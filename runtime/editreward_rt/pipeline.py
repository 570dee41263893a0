"""The fast path, written once over the graph primitives of ``GraphRunner``.

Per call: the call's distinct images go through the vision encoder in one call; the token prefix
that every sequence shares (the system prompt) is decoded once; on top of it each source's
prefix (its image, shared by all edits of that source in the call); then each triple's prefix
shared by its two rubric passes; then each rubric suffix up to ``<|Reward|>`` (nothing after it
can reach the reward position under causal attention). Every level is one padded batch.
A source's prefix can also be decoded once and kept (``encode_prefix``) for the next calls that
score edits of it. The result equals two full passes per triple to float round-off.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .families import family_for
from .preprocess import PreprocessedImage
from .prompts import Prompt

Device = Any  # an array the backend owns: a torch tensor on its device, an OrtValue, an engine buffer, numpy on a CPU


class GraphRunner(Protocol):
    """What a backend provides to run the fast path.

    The rule: arrays stay where their engine computes. The pipeline does the host-side index work
    (token ids, image rows, positions, attention masks, which cache rows and hidden rows to keep)
    and hands those in as numpy int64 arrays; everything a graph returns (image embeddings,
    caches, hidden rows) stays the backend's own ``Device`` array, which the pipeline passes back
    unopened. Per fast-path call the one device-to-host copy is ``heads``' [T, K, 2] result.
    """

    spec: object  # the family's ModelSpec
    # Optional: the most tokens (rows x columns) a decoder call takes; a longer level is decoded in
    # column chunks (``level_cuts``). For an engine whose activation memory grows with a call's tokens.
    call_tokens: int | None

    def vision(self, feeds: list[tuple[np.ndarray, ...]]) -> Device:
        """All of a call's images (``vision_feeds``' arrays for each) -> their merged embeddings,
        each image's in its graph's order, concatenated: [sum of tokens, H]."""

    def table(self, parts: list[Device], index: np.ndarray) -> Device:
        """Rows ``index`` of the concatenation of ``parts``: the call's image-embedding table."""

    def decode(self, input_ids: np.ndarray, image_embeds: Device, image_index: np.ndarray, position_ids: np.ndarray,
               attention_mask: np.ndarray, past: Device, keep: np.ndarray | None) -> tuple[Device | None, Device]:
        """One decoder call -> (the hidden states at the (batch row, position) pairs ``keep``
        [..., 2], shaped keep.shape[:-1] + [H], or None when ``keep`` is None; the new cache)."""

    def heads(self, hidden: Device) -> np.ndarray:
        """Hidden states [T, K, H] at each rubric pass's <|Reward|> -> per-head (mu, log_sigma) [T, K, 2] on the host."""

    def empty_cache(self, batch: int = 1) -> Device: ...

    def select(self, cache: Device, rows: np.ndarray) -> Device:
        """Cache rows ``rows`` along the cache layout's batch axis."""


def check_graph_io(model, graphs: dict) -> None:
    """An engine's graphs' own I/O against what the manifest's spec implies (the family's graph
    specs): names and element types in order and every fixed dimension. ``graphs``: {name: (inputs,
    outputs)}, each port as the engine reports it, turned into (its tensor names, its element type
    as the manifest names it, its dims with None where dynamic, or None for a dynamic rank). A
    folder whose spec and graphs disagree (a swapped graph, an edited spec or kv_dtype) is refused
    at load, not at the first score."""
    from .errors import ManifestError

    declared = family_for(model.spec).graph_specs(model.manifest.get("kv_dtype", "float32"))
    for name, (inputs, outputs) in graphs.items():
        for kind, got, expected in (("input", inputs, declared[name].inputs), ("output", outputs, declared[name].outputs)):
            want = [(n, dtype, list(shape)) for n, dtype, shape in expected]
            mismatch = len(got) != len(want) or any(
                wn not in gn or gt != wt or gs is None or len(gs) != len(ws)
                or any(isinstance(w, int) and g != w for g, w in zip(gs, ws))
                for (gn, gt, gs), (wn, wt, ws) in zip(got, want))
            if mismatch:
                shown = [(sorted(n), t, s) for n, t, s in got]
                raise ManifestError(f"{model.graph_path(name)}: the graph's {kind}s {shown} do not match what the "
                                    f"manifest's model spec implies, {want}: the graph or the spec was changed")


def host_table(parts: list[np.ndarray], index: np.ndarray) -> np.ndarray:
    """``GraphRunner.table`` for runners whose arrays are numpy on the host."""
    return (parts[0] if len(parts) == 1 else np.concatenate(parts))[index]


def graph_keep(keep: np.ndarray | None) -> np.ndarray:
    """``GraphRunner.decode``'s ``keep`` as an exported decoder's input, whose last layer computes
    only those rows: [T, K, 2] as given, or an empty [0, 1, 2] for a call that keeps nothing."""
    return np.zeros((0, 1, 2), np.int64) if keep is None else np.asarray(keep, np.int64)


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
    embeds: Device  # the source's merged embeddings [n_tokens, H], processor order
    n_tokens: int
    keyed: np.ndarray  # [2, P]: the prefix's token ids and table rows
    cache: Device  # one cache row of P positions
    mask: np.ndarray  # [1, P]


def _shared(keyed: list[np.ndarray], floor: int = 0) -> int:
    """Positions every sequence of ``keyed`` ([2, L] each: ids and rows) shares, at least ``floor``;
    each sequence keeps at least its last (reward) token for the levels below."""
    cut = min(common_prefix(keyed[0].T.ravel(), k.T.ravel()) // 2 for k in keyed)
    return max(floor, min(cut, min(k.shape[1] for k in keyed) - 1))


class FastPipeline:
    def __init__(self, graphs: GraphRunner):
        self.graphs = graphs
        self.spec = graphs.spec
        self.family = family_for(graphs.spec)
        self.times = StageTimes()

    def _vision(self, images: dict[str, PreprocessedImage], first_row: int) -> tuple[list[Device], dict[str, np.ndarray]]:
        """The images in one vision call -> ([its output] or [] for none, each image's rows in
        processor order, counted from ``first_row``)."""
        feeds, rows = [], {}
        for key, image in images.items():
            arrays, order = self.family.vision_feeds(image)
            feeds.append(arrays)
            rows[key] = first_row + order
            first_row += len(order)
        return ([self.graphs.vision(feeds)] if feeds else []), rows

    def encode_prefix(self, triples: list[PreparedTriple]) -> SharedPrefix:
        """The prefix every triple of one source shares, up to (not into) its edited image."""
        if len({t.source_key for t in triples}) != 1:
            raise ValueError("a shared prefix is made from triples of one source")
        t0 = time.perf_counter()
        key = triples[0].source_key
        out, rows = self._vision({key: triples[0].source}, 0)
        embeds = self.graphs.table(out, rows[key])
        self.times.vision += time.perf_counter() - t0
        t1 = time.perf_counter()
        n_src = len(rows[key])  # edited rows start here
        keyed = [np.stack((p.scored_ids, p.image_rows(0, n_src))) for t in triples for p in t.prompts]
        first_edit = min(p.images[1][0] for t in triples for p in t.prompts)
        cut = min(_shared(keyed), first_edit)
        if cut == 0:
            raise RuntimeError("sequences share no prefix; the chat template must start with text")
        root = keyed[0][:, :cut]
        _, cache, mask = self._level([(root[0], root[1])], np.zeros(1, np.int64), self.graphs.empty_cache(1),
                                     np.zeros((1, 0), dtype=np.int64), embeds)
        self.times.prefix += time.perf_counter() - t1
        return SharedPrefix(key, embeds, n_src, root, cache, mask)

    def run(self, triples: list[PreparedTriple], prefix: SharedPrefix | None = None) -> np.ndarray:
        """-> per-head outputs [T, K, 2] (mu, log_sigma). With ``prefix`` (from ``encode_prefix``),
        every triple must be of its source, and the prefix's source and positions are not redone."""
        t0 = time.perf_counter()
        parts, rows = [], {}
        if prefix is not None:
            if any(t.source_key != prefix.source_key for t in triples):
                raise ValueError("a shared prefix serves triples of its own source only")
            parts, rows = [prefix.embeds], {prefix.source_key: np.arange(prefix.n_tokens)}
        images = {}
        for t in triples:
            for key, image in ((t.source_key, t.source), (t.edited_key, t.edited)):
                if key not in rows:
                    images.setdefault(key, image)
        out, new = self._vision(images, prefix.n_tokens if prefix is not None else 0)
        parts, rows = parts + out, {**rows, **new}
        # One embedding table per call, each image's rows in processor order; each sequence
        # position points at a row of it or at -1 (text).
        keys = list(rows)
        offsets = dict(zip(keys, np.cumsum([0] + [len(rows[k]) for k in keys[:-1]]).tolist()))
        table = self.graphs.table(parts, np.concatenate([rows[k] for k in keys]))
        t1 = time.perf_counter()
        self.times.vision += t1 - t0

        seqs, owner = [], []
        for ti, t in enumerate(triples):
            for prompt in t.prompts:
                seqs.append((prompt.scored_ids, prompt.image_rows(offsets[t.source_key], offsets[t.edited_key])))
                owner.append(ti)
        group_ids = {}
        group = np.array([group_ids.setdefault(t.source_key, len(group_ids)) for t in triples], dtype=np.int64)
        hidden = self._decode_levels(seqs, np.asarray(owner), group, table, prefix)
        t2 = time.perf_counter()
        out = self.graphs.heads(hidden)
        self.times.heads += time.perf_counter() - t2
        return np.asarray(out, dtype=np.float32)

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

    def _decode_levels(self, seqs, owner, group, table, prefix) -> Device:
        """Decode, each level one padded batch continuing the one above: the prefix all sequences
        share, each source group's prefix (its source image), each triple's prefix (its edited
        image, shared by its rubric passes), then the suffixes; -> hidden at each <|Reward|> [T, K, H]."""
        keyed = [np.stack([ids, rows]) for ids, rows in seqs]  # [2, L]: equal columns mean identical inputs
        t0 = time.perf_counter()
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
        t1 = time.perf_counter()
        self.times.prefix += t1 - t0
        suffixes = [(ids[triple_cut[o]:], rows[triple_cut[o]:]) for (ids, rows), o in zip(seqs, owner)]
        last = np.array([len(ids) - 1 for ids, _ in suffixes], dtype=np.int64)
        # Each sequence's <|Reward|> as (batch row, position); sequences are triple-major, so [T, K, 2].
        keep = np.stack([np.arange(len(seqs), dtype=np.int64), last], axis=1).reshape(n_triples, -1, 2)
        hidden, _, _ = self._level(suffixes, row[owner], cache, mask, table, keep)
        self.times.suffixes += time.perf_counter() - t1
        return hidden

    def _level(self, segments, parents, cache, past_mask, table, keep: np.ndarray | None = None):
        """Decode one padded batch of segments, row b continuing past row ``parents[b]``; -> (the
        hidden rows ``keep``, the new cache, its attention mask). A runner with ``call_tokens``
        (``GraphRunner``) gets the level in column chunks of at most that many tokens a call, each
        continuing the cache of the one before: the same attention, its sums in another order."""
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
        past = self.graphs.select(cache, parents) if p else self.graphs.empty_cache(b)
        hidden = None
        cuts = level_cuts(b, s, keep, getattr(self.graphs, "call_tokens", None))
        for lo, hi in zip(cuts, cuts[1:]):
            # Only the last chunk keeps rows: every kept position lies in it (``level_cuts``).
            local = None if keep is None or hi < s else keep - np.array([0, lo], dtype=np.int64)
            hidden, past = self.graphs.decode(ids[:, lo:hi], table, rows[:, lo:hi], positions[:, lo:hi],
                                              mask[:, : p + hi], past, local)
        return hidden, past, mask


def level_cuts(batch: int, length: int, keep: np.ndarray | None, call_tokens: int | None) -> list[int]:
    """Column boundaries of a level of ``batch`` rows x ``length`` tokens decoded in calls of at most
    ``call_tokens`` tokens (None: one call). The last chunk starts before the first kept position
    (``keep``'s [..., 2] (row, position) pairs), so it holds every kept row (and may be longer)."""
    if not call_tokens or batch * length <= call_tokens:
        return [0, length]
    tail = length if keep is None else int(np.asarray(keep)[..., 1].min())
    return (list(range(0, tail, max(1, call_tokens // batch))) or [0]) + [length]


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
