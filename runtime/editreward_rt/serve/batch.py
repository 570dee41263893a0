"""Offline scoring with Ray Data: ``editreward batch``.

Pipeline: the driver reads the triples file (JSONL or Parquet; image paths relative to it) and
skips rows whose index is already in the output folder. The rest are sorted by (source,
instruction) so triples that share a source sit in the same batch, where the fast path encodes
that source once. Then:

1. decode stage (CPU tasks, ``map_batches`` with a function): load, check and resize each
   image to the model's geometry (``load_image`` + ``resize_for_model``, torch-free, given the
   model's ``ImageSpec``); a source repeated within a batch is decoded once;
2. score stage (an actor pool, ``map_batches`` with a callable class, one GPU or ``threads``
   CPUs each): patchify, build prompts and score (``Scorer.prepare`` + ``score_prepared``);
3. ``write_parquet`` into the output folder, one part file per block as blocks finish.

Every row yields one output row: a score, or ``error_type``/``error_message``. A crash loses
only the parts not yet written: a rerun reads the indices in the existing parts (dropping any
unreadable, torn part) and scores only the rest.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..batching import MERGE_WIDTH
from ..errors import EditRewardError, InputError
from ..jsonl import read_triples
from ..preprocess import ImageSpec, load_image, patchify, resize_for_model

ROW_SCHEMA = pa.schema([("index", pa.int64()), ("instruction", pa.string()), ("source", pa.string()),
                        ("edited", pa.string()), ("source_path", pa.string()), ("edited_path", pa.string()),
                        ("error_type", pa.string()), ("error_message", pa.string())])
HEAD = pa.struct([("name", pa.string()), ("mu", pa.float64()), ("log_sigma", pa.float64())])
OUTPUT_SCHEMA = pa.schema([("index", pa.int64()), ("mu", pa.float64()), ("log_sigma", pa.float64()),
                           ("sigma", pa.float64()), ("heads", pa.list_(HEAD)), ("error_type", pa.string()),
                           ("error_message", pa.string()), ("instruction", pa.string()), ("source", pa.string()),
                           ("edited", pa.string())])
IMAGES = ("source", "edited")


@dataclass
class BatchConfig:
    model: str
    backend: str | None = None
    device: str = "cpu"
    threads: int | None = 1
    max_batch: int | None = None  # triples per call; None: the device's (backends.default_max_batch)
    concurrency: int = 1
    max_input_pixels: int | None = None
    part_rows: int = 256
    progress: bool = True
    backend_options: dict = field(default_factory=dict)  # Scorer.load's ``options``
    precision: str | None = None  # Scorer.load's: None, the default (auto, or $EDITREWARD_PRECISION)


# ---------------------------------------------------------------- input


def _row(index: int, record, base: Path) -> dict:
    row = {"index": index, "instruction": None, "source": None, "edited": None, "source_path": None,
           "edited_path": None, "error_type": None, "error_message": None}
    try:
        if not isinstance(record, dict):
            raise InputError("row is not an object")
        missing = [f for f in ("instruction", *IMAGES) if record.get(f) is None]
        if missing:
            raise InputError(f"row lacks {', '.join(missing)}")
        if not isinstance(record["instruction"], str):
            raise InputError(f"instruction must be a string, got {type(record['instruction']).__name__}")
        row["instruction"] = record["instruction"]
        for f in IMAGES:
            if not isinstance(record[f], str):
                raise InputError(f"{f} must be a path string")
            row[f], row[f + "_path"] = record[f], str(base / record[f])
    except InputError as exc:
        row["error_type"], row["error_message"] = exc.kind, str(exc)
    return row


def read_rows(path: Path) -> list[dict]:
    """Every row of a JSONL (blank lines skipped; index = line number) or Parquet (index = row) file."""
    base = path.parent.resolve()
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.is_dir():
        table = pq.read_table(path)
        missing = [c for c in ("instruction", *IMAGES) if c not in table.column_names]
        if missing:
            raise InputError(f"{path}: no column {', '.join(missing)}")
        return [_row(i, r, base) for i, r in enumerate(table.select(["instruction", *IMAGES]).to_pylist())]
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise InputError(f"{path}: input must be .jsonl or .parquet")
    rows = []
    for i, record in read_triples(path):
        if isinstance(record, InputError):
            rows.append(_row(i, None, base) | {"error_type": record.kind, "error_message": str(record)})
        else:
            rows.append(_row(i, record, base))
    return rows


def done_indices(output: Path, log=None) -> set[int]:
    """Indices in the readable parts of ``output``; a torn (unreadable) part is removed."""
    done: set[int] = set()
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: output must be a folder of Parquet parts (or not exist yet)")
    for part in sorted(output.glob("*.parquet")) if output.is_dir() else ():
        try:
            done.update(pq.read_table(part, columns=["index"]).column("index").to_pylist())
        except Exception as exc:  # a part cut short by a crash: its rows are scored again
            if log:
                log(f"removing unreadable part {part.name} ({type(exc).__name__})")
            part.unlink()
    return done


def model_image_spec(model: str, max_input_pixels: int | None) -> ImageSpec:
    """The model's image geometry, read without loading any backend."""
    from ..manifest import MANIFEST, open_exported

    if (Path(model) / MANIFEST).is_file():
        spec = open_exported(model, verify=False).spec.image
    else:
        from ..checkpoint import open_checkpoint

        spec = open_checkpoint(model).spec.image
    return spec if max_input_pixels is None else replace(spec, max_input_pixels=int(max_input_pixels))


# ---------------------------------------------------------------- stage 1: decode and resize (CPU tasks)


def decode_images(batch: pa.Table, spec: ImageSpec) -> pa.Table:
    """Add ``<image>_rgb`` (uint8 HxWx3 bytes at model size), ``_h`` and ``_w``; errors go to the row."""
    rows, cache = batch.to_pylist(), {}
    for row in rows:
        for f in IMAGES:
            row[f + "_rgb"], row[f + "_h"], row[f + "_w"] = None, None, None
        if row["error_type"]:
            continue
        try:
            for f in IMAGES:
                path = row[f + "_path"]
                if path not in cache:
                    try:
                        cache[path] = np.ascontiguousarray(resize_for_model(load_image(path, spec), spec))
                    except EditRewardError as exc:
                        cache[path] = exc
                found = cache[path]
                if isinstance(found, EditRewardError):
                    raise type(found)(f"{f}: {found}")
                row[f + "_rgb"], row[f + "_h"], row[f + "_w"] = found.tobytes(), found.shape[0], found.shape[1]
        except EditRewardError as exc:
            row["error_type"], row["error_message"] = exc.kind, str(exc)
            for f in IMAGES:
                row[f + "_rgb"] = None
    extra = [pa.field(f + suffix, kind) for f in IMAGES
             for suffix, kind in (("_rgb", pa.binary()), ("_h", pa.int32()), ("_w", pa.int32()))]
    return pa.Table.from_pylist(rows, schema=pa.schema(list(ROW_SCHEMA) + extra))


def decode_memory(spec: ImageSpec, max_batch: int) -> int:
    """Memory to reserve for one decode task: a batch of resized pairs plus one large decoded input."""
    resized = max_batch * 2 * spec.max_pixels * 3
    return int(2 * resized + min(spec.max_input_pixels, 50_000_000) * 3 + (64 << 20))


# ---------------------------------------------------------------- stage 2: score (actor pool)


class ScoreActor:
    """Holds one Scorer; called with batches of decoded rows, returns result rows."""

    def __init__(self, model: str, backend: str | None, device: str, threads: int | None, max_batch: int | None,
                 max_input_pixels: int | None, options: dict | None = None, precision: str | None = None):
        from ..scorer import Scorer

        self.scorer = Scorer.load(model, backend=backend, device=device, threads=threads, max_batch=max_batch,
                                  max_input_pixels=max_input_pixels, precision=precision, options=options)

    def _patches(self, row: dict, f: str, cache: dict):
        key = row[f + "_path"]
        if key not in cache:
            rgb = np.frombuffer(row[f + "_rgb"], dtype=np.uint8).reshape(row[f + "_h"], row[f + "_w"], 3)
            cache[key] = patchify(rgb, self.scorer.image_spec)
        return cache[key]

    def _score(self, prepared: list) -> list:
        return self.scorer.score_prepared_isolated(
            prepared, lambda exc: InputError(f"scoring failed: {type(exc).__name__}: {exc}"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, cache, todo = batch.to_pylist(), {}, []
        for row in rows:
            if row["error_type"]:
                continue
            try:
                src, edit = self._patches(row, "source", cache), self._patches(row, "edited", cache)
                todo.append((row, self.scorer.prepare(row["instruction"], src, edit)))
            except EditRewardError as exc:
                row["error_type"], row["error_message"] = exc.kind, str(exc)
        for (row, _), result in zip(todo, self._score([p for _, p in todo]) if todo else []):
            if isinstance(result, EditRewardError):
                row["error_type"], row["error_message"] = result.kind, str(result)
            else:
                row.update(mu=result.mu, log_sigma=result.log_sigma, sigma=result.sigma,
                           heads=[{"name": h.name, "mu": h.mu, "log_sigma": h.log_sigma} for h in result.heads])
        out = [{f.name: row.get(f.name) for f in OUTPUT_SCHEMA} for row in rows]
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------- the job


def _count(parts: list[Path]) -> dict:
    scored = errors = 0
    for part in parts:
        t = pq.read_table(part, columns=["error_type"])
        bad = t.column("error_type").null_count
        errors += t.num_rows - bad
        scored += bad
    return {"scored": scored, "errors": errors}


def run_batch(cfg: BatchConfig, input_path, output_path, log=None) -> dict:
    """Score ``input_path`` into the Parquet folder ``output_path`` on the connected Ray (local or a cluster).

    Returns counts for this run: ``scored`` and ``errors`` (rows written now), ``skipped`` (rows an
    earlier run already wrote), ``parts`` (part files written now) and ``seconds``.
    """
    import ray

    log = log or (lambda msg: print(f"editreward batch: {msg}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    input_path, output = Path(input_path), Path(output_path)
    rows = read_rows(input_path)
    done = done_indices(output, log)
    todo = sorted((r for r in rows if r["index"] not in done),
                  key=lambda r: (r["source_path"] or "", r["instruction"] or "", r["index"]))
    log(f"{len(rows)} rows, {len(rows) - len(todo)} already done, {len(todo)} to score")
    counts = {"scored": 0, "errors": 0, "skipped": len(rows) - len(todo), "parts": 0}
    if todo:
        before = set(output.glob("*.parquet"))
        spec = model_image_spec(cfg.model, cfg.max_input_pixels)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        table = pa.Table.from_pylist(todo, schema=ROW_SCHEMA)
        step = max(1, cfg.part_rows)
        ds = ray.data.from_arrow([table.slice(s, step) for s in range(0, len(todo), step)])
        # The memory hint also keeps Ray Data from fusing decoding into the scoring actors (their
        # remote args differ), so decoding runs on any free CPU while the actors score.
        # Rows per actor call, as wide as a BatchingScorer's batches: the actor's scorer splits them
        # into its own calls (one triple each on a CPU), each source's edits continuing one prefix of it.
        rows_per_call = cfg.max_batch or MERGE_WIDTH
        ds = ds.map_batches(decode_images, fn_kwargs={"spec": spec}, batch_format="pyarrow",
                            batch_size=rows_per_call, num_cpus=1, memory=decode_memory(spec, rows_per_call))
        resources = {"num_gpus": 1} if cfg.device.startswith("cuda") else {"num_cpus": max(1, cfg.threads or 1)}
        ds = ds.map_batches(ScoreActor, fn_constructor_args=(cfg.model, cfg.backend, cfg.device, cfg.threads,
                                                             cfg.max_batch, cfg.max_input_pixels, cfg.backend_options,
                                                             cfg.precision),
                            batch_format="pyarrow", batch_size=rows_per_call,
                            compute=ray.data.ActorPoolStrategy(size=max(1, cfg.concurrency)), **resources)
        ds.write_parquet(str(output))
        parts = sorted(set(output.glob("*.parquet")) - before)
        counts.update(_count(parts), parts=len(parts))
    counts["seconds"] = round(time.perf_counter() - start, 3)
    log(json.dumps(counts))
    return counts
