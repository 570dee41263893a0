"""The triple-scoring API: ``Scorer.load(...)`` then ``score``, ``score_batch``, ``rank``, ``prefer``."""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import backends
from .errors import BackendError, EditRewardError, InputError
from .families import family_for
from .manifest import MANIFEST, read_manifest
from .pipeline import PreparedTriple, SharedPrefix, fuse
from .preprocess import PreprocessedImage, preprocess_image

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class HeadScore:
    name: str
    mu: float
    log_sigma: float


@dataclass(frozen=True)
class Score:
    """The fused reward: ``mu`` is what users rank by; ``log_sigma`` is its uncertainty in log space."""

    mu: float
    log_sigma: float
    heads: tuple[HeadScore, ...]

    @property
    def sigma(self) -> float:
        return math.exp(self.log_sigma)

    def to_dict(self) -> dict:
        return {"mu": self.mu, "log_sigma": self.log_sigma, "sigma": self.sigma,
                "heads": [{"name": h.name, "mu": h.mu, "log_sigma": h.log_sigma} for h in self.heads]}


def preference(a: Score, b: Score) -> float:
    """P(a preferred over b) under independent Gaussians N(mu, sigma^2)."""
    z = (a.mu - b.mu) / math.sqrt(a.sigma**2 + b.sigma**2)
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _backend_name(path_or_id, backend: str | None, device: str = "cpu", precision: str | None = None,
                  options=()) -> str:
    """The backend asked for; else a checkpoint's (torch) or the one an exported folder names, and
    for a float32 ONNX folder on a CPU the fastest engine installed (``backends.cpu_engine``) that
    takes every option given (``optimization`` or ``io_binding`` name ONNX Runtime)."""
    if backend:
        return backend
    folder = Path(str(path_or_id))
    if not (folder.is_dir() and (folder / MANIFEST).is_file()):
        return backends.DEFAULT_CHECKPOINT
    manifest = read_manifest(folder)
    runtime = manifest.get("runtime", backends.DEFAULT_EXPORTED)
    # float32 graphs only: float16/bfloat16 exports (for GPUs) keep the runtime they were made for
    float32 = manifest.get("precision", "float32") == "float32"
    if runtime == backends.DEFAULT_EXPORTED and "quantization" not in manifest and float32 and device == "cpu":
        engine = backends.cpu_engine(precision)
        return engine if set(options) <= set(backends.backend(engine).options) else runtime
    return runtime


def _merge_options(named: dict, options: dict | None) -> dict:
    """``Scorer.load``'s named backend options and its ``options`` dict, one value per option."""
    twice = sorted(set(named) & set(options or {}))
    if twice:
        raise BackendError(f"option {twice[0]!r} has an argument of its own ({twice[0]}=, or "
                           f"--{twice[0].replace('_', '-')} on the command line); give it there, not among the options")
    return {**named, **(options or {})}


def _unpack(index: int, triple) -> tuple:
    """(instruction, source, edited) from a 3-sequence or a dict with those keys, or an InputError."""
    try:
        if isinstance(triple, dict):
            return triple["instruction"], triple["source"], triple["edited"]
        if isinstance(triple, (str, bytes)):
            raise TypeError(f"a {type(triple).__name__}")
        instruction, source, edited = triple
        return instruction, source, edited
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"triple {index} is not (instruction, source, edited) nor a dict with those keys: "
                         f"{type(exc).__name__}: {exc}") from None


def _unpack_group(index: int, group) -> tuple:
    """(instruction, source, [edited, ...]) or an InputError."""
    try:
        instruction, source, edits = group
        if isinstance(edits, (str, bytes)):
            raise TypeError("edits is one value, not a list")
        return instruction, source, list(edits)
    except (TypeError, ValueError) as exc:
        raise InputError(f"group {index} is not (instruction, source, [edited, ...]): {type(exc).__name__}: {exc}") from None


def _check_errors(errors: str) -> None:
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")


def attempt(errors: str, what: str, fn, *args):
    """``fn(*args)``, or with ``errors="return"`` its failure as an EditRewardError (anything else
    becomes an InputError naming ``what``: a bug or an input no check foresaw costs that item only)."""
    try:
        return fn(*args)
    except EditRewardError as exc:
        if errors == "raise":
            raise
        return exc
    except Exception as exc:
        if errors == "raise":
            raise
        log.warning("preparing %s failed", what, exc_info=True)
        return InputError(f"{what} could not be prepared: {type(exc).__name__}: {exc}")


def scoring_failed(exc: Exception) -> BackendError:
    return BackendError(f"scoring failed: {type(exc).__name__}: {exc}")


class Scorer:
    """Scores (instruction, source image, edited image) triples. Safe to share between threads."""

    def __init__(self, backend, model, max_batch: int | None = None, max_input_pixels: int | None = None):
        """``max_batch``: triples per fast-path call (default: ``backends.default_max_batch`` of the
        device in the backend's description)."""
        self.backend = backend
        self.spec = model.spec
        self.image_spec = model.spec.image
        if max_input_pixels is not None:
            self.image_spec = replace(self.image_spec, max_input_pixels=int(max_input_pixels))
        self.builder = family_for(model.spec).prompt_builder(model.tokenizer, model.chat_text, model.templates)
        self.max_batch = max_batch or backends.default_max_batch(backend.description["device"])
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path_or_id: str | os.PathLike, backend: str | None = None, mode: str = "fast", base: str | None = None,
             prompts_from: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = None,
             dtype: str | None = None, max_batch: int | None = None, max_input_pixels: int | None = None,
             memory: str | None = None, precision: str | None = None, options: dict | None = None) -> "Scorer":
        """``path_or_id``: a checkpoint (hub id or folder; torch backend) or an exported model folder.
        ``max_batch``: triples per fast-path call (default: ``backends.default_max_batch`` of the
        device the backend runs on). ``max_input_pixels`` caps decoded image size (decompression-bomb
        guard). ``memory`` (torch backend): ``resident`` weights stay on the device, ``per-call``
        they are there only during a call. ``options``: the backend's other options (its registry
        entry lists them, e.g. ``{"io_binding": True}``, ``{"cuda_graphs": True}``,
        ``{"compile": "reduce-overhead"}``). A None option is not given; one the backend does not
        take is a BackendError naming those that take it.
        ``precision``: ``auto`` (the default, or $EDITREWARD_PRECISION), ``fp32`` or ``bf16``;
        auto is bf16 where the device computes it natively (``hardware.resolve_precision``), and
        the description's ``precision`` says which ran. With no ``backend``, a float ONNX folder on
        a CPU runs on the fastest engine installed for that precision (``backends.cpu_engine``)."""
        named = {"base": base, "prompts_from": prompts_from, "device": device, "threads": threads, "dtype": dtype,
                 "memory": memory, "precision": precision}
        merged = _merge_options(named, options)
        given = [key for key, value in merged.items() if value is not None]
        entry = backends.backend(_backend_name(path_or_id, backend, device, precision, given))
        impl, model = entry.load(path_or_id, mode=mode, **merged)
        return cls(impl, model, max_batch=max_batch, max_input_pixels=max_input_pixels)

    @property
    def description(self) -> dict:
        return dict(self.backend.description)

    @property
    def engine(self) -> str:
        """The engine and the precision that ran, as each result names them: ``openvino bf16``,
        ``onnxruntime fp32 ort-int8`` (a quantized folder adds its scheme)."""
        d = self.backend.description
        return " ".join(str(x) for x in (d["backend"], d.get("precision"), d.get("quantization")) if x)

    def preprocess(self, image) -> PreprocessedImage:
        return image if isinstance(image, PreprocessedImage) else preprocess_image(image, self.image_spec)

    def prepare(self, instruction: str, source, edited) -> PreparedTriple:
        src, edit = self.preprocess(source), self.preprocess(edited)
        prompts = self.builder.build(instruction, src.n_tokens, edit.n_tokens)
        return PreparedTriple(src, edit, prompts)

    def score_prepared(self, triples: list[PreparedTriple], prefix: SharedPrefix | None = None) -> list[Score]:
        """Scores in chunks of ``max_batch``; with ``prefix`` (of these triples' one source) each
        chunk continues that prefix instead of encoding the source again. Without one, when the
        triples take more than one call, the edits of each source continue one prefix of it, so a
        source is encoded once however small the calls."""
        if prefix is None and len(triples) > self.max_batch:
            return self._score_by_source(triples)
        return self._chunks(triples, prefix)

    def _chunks(self, triples: list[PreparedTriple], prefix: SharedPrefix | None) -> list[Score]:
        scores = []
        for start in range(0, len(triples), self.max_batch):
            chunk = triples[start : start + self.max_batch]
            with self._lock:
                per_head = self.backend.head_outputs(chunk) if prefix is None else self.backend.head_outputs(chunk, prefix)
            scores.extend(self._scores(per_head))
        return scores

    def _score_by_source(self, triples: list[PreparedTriple]) -> list[Score]:
        """``score_groups``' policy on a flat list: a source with more triples than a call takes
        continues one prefix of it across its calls; the other sources share calls, never split
        across two (so each is still encoded once per call), in the order they first appear."""
        by_source: dict[str, list[int]] = {}
        for i, t in enumerate(triples):
            by_source.setdefault(t.source_key, []).append(i)
        large = [idx for idx in by_source.values() if len(idx) > self.max_batch]
        out: list = [None] * len(triples)

        def place(idx: list[int], prefix) -> None:
            for i, score in zip(idx, self._chunks([triples[i] for i in idx], prefix)):
                out[i] = score

        for idx in large:
            place(idx, self.shared_prefix([triples[i] for i in idx]))
        pending: list[int] = []
        for idx in (idx for idx in by_source.values() if len(idx) <= self.max_batch):
            if len(pending) + len(idx) > self.max_batch:
                place(pending, None)
                pending = []
            pending.extend(idx)
        if pending:
            place(pending, None)
        return out

    def shared_prefix(self, triples: list[PreparedTriple]) -> SharedPrefix | None:
        """The prefix of these triples' one source (None where the backend decodes each triple in full)."""
        with self._lock:
            return self.backend.encode_prefix(triples)

    def score_prepared_isolated(self, triples: list[PreparedTriple], wrap, prefix: SharedPrefix | None = None) -> list:
        """Score a batch; if it fails as a whole, score triple by triple so one bad triple costs
        only its own result. A failure is returned in its place: an ``EditRewardError`` as is,
        anything else as ``wrap(exc)`` (called inside the ``except``, so it may log the traceback)."""
        if not triples:
            return []
        try:
            return self.score_prepared(triples, prefix)
        except Exception:
            log.warning("a batch of %d failed; scoring its triples one by one", len(triples), exc_info=True)
        out = []
        for triple in triples:
            try:
                out.append(self.score_prepared([triple])[0])
            except EditRewardError as exc:
                out.append(exc)
            except Exception as exc:
                out.append(wrap(exc))
        return out

    def _scores(self, per_head: np.ndarray) -> list[Score]:
        fused = fuse(per_head, self.spec.heads.fusion)
        names = self.spec.heads.names
        return [
            Score(float(f[0]), float(f[1]), tuple(HeadScore(n, float(h[0]), float(h[1])) for n, h in zip(names, row)))
            for f, row in zip(fused, per_head)
        ]

    def score(self, instruction: str, source, edited) -> Score:
        return self.score_prepared([self.prepare(instruction, source, edited)])[0]

    def score_batch(self, triples, errors: str = "raise") -> list:
        """``triples``: (instruction, source, edited) tuples or dicts. With ``errors="return"`` a bad
        triple yields its ``EditRewardError`` in place and every other triple is still scored."""
        _check_errors(errors)
        results = [attempt(errors, f"triple {i}", lambda i, t: self.prepare(*_unpack(i, t)), i, t)
                   for i, t in enumerate(triples)]
        self._fill(results, errors)
        return results

    def _fill(self, items: list, errors: str, prefix: SharedPrefix | None = None) -> None:
        """Replace the PreparedTriples of ``items`` by their scores (errors stay in place)."""
        todo = [i for i, item in enumerate(items) if isinstance(item, PreparedTriple)]
        batch = [items[i] for i in todo]
        if errors == "raise":
            outcomes = self.score_prepared(batch, prefix)
        else:
            outcomes = self.score_prepared_isolated(batch, scoring_failed, prefix)
        for i, outcome in zip(todo, outcomes):
            items[i] = outcome

    def score_groups(self, groups, errors: str = "raise") -> list[list]:
        """``groups``: (instruction, source, [edited, ...]) -> each group's scores, in order. Each
        source is preprocessed once, and its image and prefix are encoded once per group, also
        across the chunks of a group larger than ``max_batch``; smaller groups share chunks. With
        ``errors="return"`` a bad edit (or source: all its group) yields its error in place."""
        _check_errors(errors)
        prepared = [self._prepare_group(gi, group, errors) for gi, group in enumerate(groups)]
        pending: list[list] = []  # small groups waiting to fill a chunk
        for items in prepared:
            n = sum(isinstance(item, PreparedTriple) for item in items)
            if n > self.max_batch:
                self._fill(items, errors, self._group_prefix(items, errors))
                continue
            if sum(isinstance(i, PreparedTriple) for g in pending for i in g) + n > self.max_batch:
                self._fill_together(pending, errors)
                pending = []
            pending.append(items)
        self._fill_together(pending, errors)
        return prepared

    def _prepare_group(self, index: int, group, errors: str) -> list:
        instruction, source, edits = attempt("raise", f"group {index}", _unpack_group, index, group)
        src = attempt(errors, f"group {index} source", self.preprocess, source)
        if isinstance(src, EditRewardError):
            return [src] * len(edits)
        return [attempt(errors, f"group {index} edit {e}", self.prepare, instruction, src, edit)
                for e, edit in enumerate(edits)]

    def _group_prefix(self, items: list, errors: str) -> SharedPrefix | None:
        """A large group's shared prefix; if it cannot be made, its chunks are scored without it."""
        triples = [item for item in items if isinstance(item, PreparedTriple)]
        if errors == "raise":
            return self.shared_prefix(triples)
        try:
            return self.shared_prefix(triples)
        except Exception:
            log.warning("the shared prefix of a group failed; scoring its chunks without it", exc_info=True)
            return None

    def _fill_together(self, groups: list[list], errors: str) -> None:
        """Score several small groups in one call (each source's prefix is still decoded once)."""
        flat = [item for items in groups for item in items]
        self._fill(flat, errors)
        at = 0
        for items in groups:
            items[:] = flat[at : at + len(items)]
            at += len(items)

    def rank(self, instruction: str, source, edits) -> list[Score]:
        """Scores for each edit of one source; the source is preprocessed and encoded once, and
        its prefix decoded once, however many chunks the edits take."""
        return self.score_groups([(instruction, source, edits)])[0]

    def prefer(self, instruction: str, source, a, b) -> float:
        """P(edit ``a`` is preferred over edit ``b``)."""
        sa, sb = self.rank(instruction, source, [a, b])
        return preference(sa, sb)
