"""A pickle reader for the trainers' reward protocols that cannot run code.

Flow-GRPO-style clients (Edit-R1, verl-omni) send ``pickle.dumps(payload)``; their own servers call
``pickle.loads`` on it, so anyone who reaches the port runs code. Here a body is first walked
opcode by opcode (nothing executed) and refused when it names a persistent id, an extension code,
a protocol-0/1 class instantiation, a memo slot far past what the body could fill, or too many
opcodes. Then an ``Unpickler`` whose ``find_class`` admits only the constructors that plain data
needs (set, frozenset, complex, bytearray, the ``_codecs.encode`` that protocol 2 writes bytes
with) and numpy's string arrays and scalars, each through a wrapper that checks its arguments.
Every other global is refused with ``PickleRefusedError`` before it is even looked up. The
result is walked once more and must hold only builtin containers, str, bytes, numbers, None,
booleans, and numpy arrays and scalars of string (or plain number) dtypes.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re

import numpy as np

from .schemas import ApiError

MAX_OPCODES = 1_000_000  # a 64-image batch pickles to a few hundred; 1M Python-level steps is ~1 s
MAX_OBJECTS = 1_000_000  # distinct objects in the decoded payload
MAX_ARRAY_ITEMS = 1_000_000  # elements of one numpy array


class InvalidPickleError(ApiError):
    """The body is not a pickle this service can read (truncated, malformed, or too large a structure)."""

    kind = "invalid_pickle"
    status = 400


class PickleRefusedError(ApiError):
    """The pickle names a global or opcode that could run code; nothing of it was executed."""

    kind = "pickle_refused"
    status = 400


# Opcodes that reach code outside find_class's checks, or that only code-running pickles need.
_REFUSED_OPS = {"PERSID", "BINPERSID", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEWOBJ", "NEWOBJ_EX"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _scan(body: bytes) -> None:
    """Refuse what ``find_class`` cannot see before the C unpickler runs. A memo index is checked
    because the C unpickler grows its memo table to twice the largest index it is given: one
    ``LONG_BINPUT 0xffffffff`` would make it allocate and zero 64 GiB."""
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(body))):
            if count >= MAX_OPCODES:
                raise InvalidPickleError(f"the pickle has more than {MAX_OPCODES} opcodes")
            if op.name in _REFUSED_OPS:
                raise PickleRefusedError(f"pickle opcode {op.name} is not accepted (it builds arbitrary objects)")
            if op.name in _PUT_OPS and not 0 <= int(arg) <= count:
                raise InvalidPickleError(f"pickle memo index {arg} is out of range")
    except (ValueError, EOFError) as exc:  # genops reports a truncated or unknown opcode as ValueError
        raise InvalidPickleError(f"not a valid pickle: {exc}") from None


# ---------------------------------------------------------------- the admitted constructors


def _one_iterable(kind):
    def build(items=()):
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise PickleRefusedError(f"{kind.__name__}() from a {type(items).__name__}")
        return kind(items)

    return build


def _complex(real=0.0, imag=0.0):
    if not all(isinstance(x, (int, float)) for x in (real, imag)):
        raise PickleRefusedError("complex() from something other than two numbers")
    return complex(real, imag)


def _bytearray(data=b""):
    if not isinstance(data, (bytes, bytearray)):
        raise PickleRefusedError("bytearray() from something other than bytes")
    return bytearray(data)


def _codecs_encode(text, encoding):
    """Protocol 2 writes bytes as ``_codecs.encode(text, "latin1")``; nothing else is admitted."""
    if not isinstance(text, str) or encoding != "latin1":
        raise PickleRefusedError("_codecs.encode other than protocol 2's bytes")
    return text.encode("latin-1")


# Arrays: strings and bytes (Flow-GRPO's prompts after np.array_split), or objects that turn out
# to be str (an object array's elements come through this same reader and are checked after).
# Scalars: those, and booleans and plain numbers (metadata values). Never structured or datetime.
_DTYPE = re.compile(r"[<>|=]?(?:[US]\d*|O\d?|b1|[iu][1248]|f[248])")
_ARRAY_KINDS = set("USO")
_SCALAR_KINDS = set("USbiuf")
_NDARRAY = object()  # what "numpy.ndarray" resolves to: a token for _reconstruct, never the class itself


def _dtype(spec, align=False, copy=False):
    if not isinstance(spec, str) or not _DTYPE.fullmatch(spec):
        raise PickleRefusedError(f"numpy dtype {spec!r} is not accepted (string, object or plain number dtypes only)")
    return np.dtype(spec, align=bool(align), copy=True)  # a copy: BUILD's setstate must not touch a shared dtype


def _checked_dtype(dtype, kinds) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in kinds or dtype.names is not None or dtype.subdtype:
        raise PickleRefusedError(f"numpy dtype {dtype!r} is not accepted here")
    return dtype


def _reconstruct(subtype, shape, code):
    """numpy's array unpickling starts from ``_reconstruct(ndarray, (0,), b'b')``; its setstate
    then fills it from the stream (and numpy checks the data against shape and dtype)."""
    if subtype is not _NDARRAY or tuple(shape) != (0,) or code not in (b"b", "b"):
        raise PickleRefusedError("numpy _reconstruct other than numpy's own array pickling")
    return np.ndarray((0,), np.uint8)


def _frombuffer(buffer, dtype, shape, order):
    """Protocol 5's in-band numpy arrays: ``_frombuffer(data, dtype, shape, order)``."""
    dtype = _checked_dtype(dtype, _ARRAY_KINDS - {"O"})
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(shape, tuple) or order not in ("C", "F"):
        raise PickleRefusedError("numpy _frombuffer with unexpected arguments")
    if not all(isinstance(n, int) and 0 <= n <= MAX_ARRAY_ITEMS for n in shape):
        raise InvalidPickleError(f"numpy array shape {shape} is out of range")
    size = int(np.prod(shape, dtype=np.int64))
    if size > MAX_ARRAY_ITEMS or size * dtype.itemsize != len(buffer):
        raise InvalidPickleError(f"numpy array of shape {shape} does not match its {len(buffer)} bytes")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order)


def _scalar(dtype, data=None):
    dtype = _checked_dtype(dtype, _SCALAR_KINDS)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise PickleRefusedError("numpy scalar with unexpected data")
    return np.frombuffer(data, dtype=dtype)[0]


_NUMPY = {"dtype": _dtype, "ndarray": _NDARRAY}
_MULTIARRAY = {"_reconstruct": _reconstruct, "scalar": _scalar}
_BUILTINS = {"set": _one_iterable(set), "frozenset": _one_iterable(frozenset), "complex": _complex,
             "bytearray": _bytearray}
_ADMITTED = {
    "builtins": _BUILTINS, "__builtin__": _BUILTINS,  # protocol 2 writes Python 2's module name
    "_codecs": {"encode": _codecs_encode},
    "numpy": _NUMPY,
    "numpy.core.multiarray": _MULTIARRAY, "numpy._core.multiarray": _MULTIARRAY,  # numpy 1.x, numpy 2.x
    "numpy.core.numeric": {"_frombuffer": _frombuffer}, "numpy._core.numeric": {"_frombuffer": _frombuffer},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _ADMITTED.get(module, {}).get(name)
        if found is None:
            raise PickleRefusedError(f"the pickle names {module}.{name}; only plain data is accepted "
                                     "(containers, str, bytes, numbers, None, booleans, numpy strings)")
        return found

    def persistent_load(self, pid):
        raise PickleRefusedError("pickle persistent ids are not accepted")


# ---------------------------------------------------------------- the decoded payload

_LEAVES = (str, bytes, bytearray, bool, int, float, complex, type(None))


def _check(payload) -> None:
    """Every object reachable from ``payload`` is plain data; each visited once (a pickle can share
    objects through its memo, so a walk that followed every reference could take 2^n steps)."""
    seen, todo = set(), [payload]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if len(seen) > MAX_OBJECTS:
            raise InvalidPickleError(f"the pickle holds more than {MAX_OBJECTS} objects")
        if isinstance(obj, _LEAVES):
            continue
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, np.ndarray):
            _checked_dtype(obj.dtype, _ARRAY_KINDS)
            if type(obj) is not np.ndarray or obj.size > MAX_ARRAY_ITEMS:
                raise PickleRefusedError("a numpy array subclass, or an array over the size limit")
            if obj.dtype.kind == "O" and not all(isinstance(x, str) for x in obj.ravel()):
                raise PickleRefusedError("a numpy object array of anything but str")
        elif isinstance(obj, np.generic):
            _checked_dtype(obj.dtype, _SCALAR_KINDS)
        else:
            raise PickleRefusedError(f"the pickle decodes to a {type(obj).__name__}; only plain data is accepted")


def loads(body: bytes):
    """``pickle.loads`` for untrusted bodies: plain data only, or a typed 4xx error; never runs code."""
    if not body:
        raise InvalidPickleError("request body is empty")
    _scan(body)
    try:
        payload = _Unpickler(io.BytesIO(body)).load()
    except ApiError:
        raise
    except Exception as exc:  # the C unpickler and numpy's setstate raise many classes for bad input
        raise InvalidPickleError(f"not a valid pickle: {type(exc).__name__}: {exc}") from None
    _check(payload)
    return payload


def dumps(payload) -> bytes:
    """An answer for pickle clients: protocol 4, which every Python 3.8+ client reads."""
    return pickle.dumps(payload, protocol=4)
