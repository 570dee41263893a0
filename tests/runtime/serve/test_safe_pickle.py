"""The restricted unpickler: plain data in, every code-running or resource-eating pickle refused."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest

from editreward_rt.serve import safe_pickle
from editreward_rt.serve.safe_pickle import InvalidPickleError, PickleRefusedError

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


class _System:
    """A pickle that runs ``os.system(command)`` when loaded by ``pickle.loads``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').getpid()",)


class _Allocate:
    def __reduce__(self):
        return np.ndarray, ((2**40,), "f8")


PLAIN = [
    {"ref_images": [b"\xff\xd8jpeg"], "images": [b"\xff\xd8"], "prompts": ["make it red"],
     "metadatas": [{"requirement": "", "n": 3, "w": 0.5, "tags": ("a", None, True), "ids": {1, 2}}]},
    [bytearray(b"x"), frozenset({"a"}), complex(1, 2), -(2**70), float("inf")],
    np.array(["make it red", "add a hat"]),  # Flow-GRPO's prompts after np.array_split
    np.array([b"a", b"bc"]),
    np.array(["a", "b"], dtype=object),
    [np.str_("a prompt"), np.float64(0.25), np.int64(3), np.bool_(True)],
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_data_round_trips(protocol):
    for payload in PLAIN:
        got = safe_pickle.loads(pickle.dumps(payload, protocol=protocol))
        if isinstance(payload, np.ndarray):
            assert got.dtype == payload.dtype and got.tolist() == payload.tolist()
        else:
            assert got == payload and type(got) is type(payload)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_code_running_pickles_are_refused_and_never_run(protocol, tmp_path):
    marker = tmp_path / "ran"
    hostile = [_System(f"touch {marker}"), {"images": [_System(f"touch {marker}")]}, _Eval(),
               [np.dtype("f8"), _System(f"touch {marker}")]]
    for payload in hostile:
        body = pickle.dumps(payload, protocol=protocol)
        with pytest.raises(PickleRefusedError):
            safe_pickle.loads(body)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_System(f"touch {marker}"), protocol=protocol))  # the same body does run under pickle
    assert marker.exists()


def test_numpy_is_admitted_only_as_strings():
    for payload in (np.arange(4.0), np.zeros((2, 2), np.uint8), np.array([{"a": 1}], dtype=object),
                    np.array([1, "a"], dtype=object), np.dtype([("a", "f4")]), np.datetime64("2020-01-01"),
                    np.ma.masked_array(["a"]), np.array(["a"]).view(np.recarray)):
        with pytest.raises(PickleRefusedError):
            safe_pickle.loads(pickle.dumps(payload, protocol=4))
    # numpy.ndarray resolves to a token for _reconstruct, never the class: calling it cannot allocate.
    with pytest.raises(InvalidPickleError):
        safe_pickle.loads(pickle.dumps(_Allocate(), protocol=4))


def test_resource_attacks_are_refused_fast():
    start = time.monotonic()
    memo_bomb = b"\x80\x02N" + b"r\xff\xff\xff\xff" + b"."  # LONG_BINPUT 2**32-1: a 64 GiB memo table
    with pytest.raises(InvalidPickleError, match="memo"):
        safe_pickle.loads(memo_bomb)
    # 60 levels of [x, x] sharing one object: 2^60 paths, 60 distinct objects.
    shared = []
    for _ in range(60):
        shared = [shared, shared]
    assert safe_pickle.loads(pickle.dumps(shared, protocol=4))[0] is not None
    loop = []
    loop.append(loop)
    assert safe_pickle.loads(pickle.dumps(loop, protocol=4))[0][0] is not None
    with pytest.raises(InvalidPickleError, match="opcodes"):
        safe_pickle.loads(pickle.dumps([None] * (safe_pickle.MAX_OPCODES + 1), protocol=4))
    assert time.monotonic() - start < 30.0


def test_malformed_bodies_are_invalid_pickles():
    good = pickle.dumps({"images": [b"x" * 100], "prompts": ["p"]}, protocol=4)
    for body in (b"", b"not a pickle", good[:-1], good[:10], b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
                 b"\x80\x02cbuiltins\ngetattr\n."):
        with pytest.raises((InvalidPickleError, PickleRefusedError)):
            safe_pickle.loads(body)
