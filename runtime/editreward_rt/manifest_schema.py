"""The manifest's schema: every field the runtime reads is checked once, at load, before anything
is sized from it or handed to a library. A malformed field is a ``ManifestError`` whose message
starts with its JSON path (``spec.image.image_std[1]: ...``), so a buggy or hostile exporter's
folder fails at ``Scorer.load`` with the field named, never later with a library's error.

The readers below are shared with the model families, which read their own ``spec`` section
with them (``ModelSpec.from_dict``); this module checks the sections every family shares.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

from .errors import ManifestError

# Element types of the graphs' float I/O, precision and key/value cache; index inputs are int64.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
IO_DTYPES = FLOAT_DTYPES + ("int64",)
MAX_DIM = 1 << 31  # a fixed graph dimension beyond this is no real model's


def child(at: str, key) -> str:
    """The JSON path of ``key`` inside ``at``: ``a.b`` for a field, ``a[1]`` for an index."""
    if isinstance(key, int):
        return f"{at}[{key}]"
    return f"{at}.{key}" if at else str(key)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def refuse(at: str, value, problem: str):
    raise ManifestError(f"{at}={_shown(value)}: {problem}")


def integer(value, at: str, lo: int | None = None, hi: int | None = None) -> int:
    """A JSON integer (not a bool, not a float such as 1e15) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        refuse(at, value, "not an integer")
    if lo is not None and value < lo:
        refuse(at, value, f"below {lo}")
    if hi is not None and value > hi:
        refuse(at, value, f"above {hi}")
    return value


def number(value, at: str, lo: float | None = None, hi: float | None = None, positive: bool = False) -> float:
    """A finite JSON number in [lo, hi] (``positive``: also above 0)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        refuse(at, value, "not a number")
    if not math.isfinite(value):
        refuse(at, value, "not finite")
    if positive and value <= 0:
        refuse(at, value, "not above 0")
    if lo is not None and value < lo:
        refuse(at, value, f"below {lo}")
    if hi is not None and value > hi:
        refuse(at, value, f"above {hi}")
    return float(value)


def string(value, at: str, choices=None) -> str:
    """A non-empty JSON string, one of ``choices`` when given."""
    if not isinstance(value, str) or not value:
        refuse(at, value, "not a non-empty string")
    if choices is not None and value not in choices:
        refuse(at, value, f"not one of {', '.join(map(str, choices))}")
    return value


def array(value, at: str, item: Callable[[Any, str], Any], length: int | None = None, min_length: int = 0) -> tuple:
    """A JSON array whose elements each pass ``item`` -> a tuple of them."""
    if not isinstance(value, list):
        refuse(at, value, "not an array")
    if length is not None and len(value) != length:
        refuse(at, value, f"has {len(value)} elements, not {length}")
    if len(value) < min_length:
        refuse(at, value, f"has {len(value)} elements, fewer than {min_length}")
    return tuple(item(v, child(at, i)) for i, v in enumerate(value))


def obj(value, at: str) -> dict:
    if not isinstance(value, dict):
        refuse(at, value, "not an object")
    return value


def fields(value, at: str, readers: dict[str, Callable[[Any, str], Any]], optional=()) -> dict:
    """An object whose keys are ``readers``' (those in ``optional`` may be missing, no others may be
    there) -> {key: reader(value[key], its path)}."""
    data = obj(value, at)
    unknown = sorted(set(data) - set(readers))
    if unknown:
        raise ManifestError(f"{child(at, unknown[0])}: unknown field (known: {', '.join(readers)})")
    missing = [key for key in readers if key not in data and key not in optional]
    if missing:
        raise ManifestError(f"{child(at, missing[0])}: missing")
    return {key: read(data[key], child(at, key)) for key, read in readers.items() if key in data}


positive_int = partial(integer, lo=1)


# ---------------------------------------------------------------- the sections every family shares


def check_header(manifest: dict, known_versions: tuple, families, runtimes) -> None:
    """The fields read before the folder is opened: which runtime, which family, which version."""
    version = manifest.get("manifest_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in known_versions:
        raise ManifestError(f"manifest_version {version!r} is not one this runtime reads {known_versions}. "
                            "Upgrade editreward-deploy or re-export the model.")
    for key, choices in (("family", families), ("runtime", runtimes)):
        if key in manifest:
            string(manifest[key], key, choices)


def _dim(value, at: str):
    """A graph dimension: a fixed size or a named dynamic axis."""
    return string(value, at) if isinstance(value, str) else integer(value, at, 0, MAX_DIM)


_io_item = partial(fields, readers={"name": string, "dtype": partial(string, choices=IO_DTYPES),
                                    "shape": partial(array, item=_dim)})
_graph = partial(fields, readers={"file": string, "inputs": partial(array, item=_io_item),
                                  "outputs": partial(array, item=_io_item)})


def check_fields(manifest: dict, needs_graphs: bool) -> None:
    """Types, ranges and known values of the shared sections (the family reads ``spec``):
    file entries, dtypes, the graphs' declared I/O, the quantization and TensorRT sections.
    ``needs_graphs``: the folder's runtime reads graphs (not a torch weights folder)."""
    for key in ("precision", "compute_dtype", "kv_dtype"):
        if key in manifest:
            string(manifest[key], key, FLOAT_DTYPES)
    for key in ("tokenizer", "weights"):
        if key in manifest:
            string(manifest[key], key)
    for key in ("spec", "templates"):
        obj(manifest.get(key), key)
    string(manifest.get("chat_text"), "chat_text")
    graphs = obj(manifest.get("graphs", {}), "graphs")
    if needs_graphs and not graphs:
        raise ManifestError("graphs: empty, but the folder's runtime reads graphs")
    for name, graph in graphs.items():
        _graph(graph, child("graphs", name))
    _check_quantization(manifest.get("quantization"))
    _check_trt(manifest.get("trt"))


def _check_quantization(section) -> None:
    """The scheme's own config is checked by ``schemes.scheme_from_dict``; here its shape."""
    if section is None:
        return
    obj(section, "quantization")
    string(section.get("scheme"), "quantization.scheme")
    integer(section.get("version"), "quantization.version", 0)
    if "config" in section:
        obj(section["config"], "quantization.config")


def _check_trt(section) -> None:
    """The engines' file entries (the backend checks the rest of the section against TensorRT)."""
    if section is None:
        return
    engines = obj(obj(section, "trt").get("engines", {}), "trt.engines")
    for name, engine in engines.items():
        at = child("trt.engines", name)
        string(obj(engine, at).get("file"), child(at, "file"))


STALE = ("the graphs or the manifest were changed, or an older editreward-deploy exported them (the graphs' I/O "
         "has changed since: re-export the model with `editreward export`)")


def check_graph_io(graphs: dict, expected: dict) -> None:
    """The manifest's declared graph I/O against what its spec and kv_dtype imply (the family's
    ``graph_specs``): the same roles, and per role the same names, dtypes and shapes in order.
    A consistent-looking folder whose declaration disagrees (an edited kv_dtype, an edited spec,
    graphs exported before their I/O changed) is refused here, not at the first score."""
    if not graphs:
        return
    if set(graphs) != set(expected):
        raise ManifestError(f"graphs: declares {sorted(graphs)}, but this model family's graphs are {sorted(expected)}")
    for name, spec in expected.items():
        want = spec.io()
        for kind in ("inputs", "outputs"):
            at, got = child(child("graphs", name), kind), graphs[name][kind]
            if len(got) != len(want[kind]):
                refuse(at, [i["name"] for i in got], f"has {len(got)} entries; the spec implies {len(want[kind])}: {STALE}")
            for i, (g, w) in enumerate(zip(got, want[kind])):
                for key in ("name", "dtype", "shape"):
                    if g[key] != w[key]:
                        refuse(child(child(at, i), key), g[key], f"the spec and kv_dtype imply {w[key]!r}: {STALE}")
