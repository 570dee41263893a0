"""The one JSONL triple reader: lines end at \\n only, each line decodes on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from editreward_rt.errors import InputError
from editreward_rt.jsonl import parse_triple, read_lines, read_triples


def test_lines_end_at_newline_only(tmp_path):
    record = {"instruction": "put a sign saying\u2028OPEN\u0085 here\r", "source": "a.png", "edited": "b.png"}
    path = tmp_path / "t.jsonl"
    path.write_bytes((json.dumps(record, ensure_ascii=False) + "\n\n" + json.dumps(record) + "\r\n").encode())
    assert len(read_lines(path)) == 3
    got = read_triples(path)
    assert [i for i, _ in got] == [0, 2] and all(r == record for _, r in got)


def test_a_bad_line_costs_that_line(tmp_path):
    good = json.dumps({"instruction": "x", "source": "a.png", "edited": "b.png"}).encode()
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join([good, b"\xff\xfe not utf-8", b"[1, 2]", b'{"instruction": "x"}', b"{", good]))
    got = read_triples(path)
    assert [i for i, _ in got] == [0, 1, 2, 3, 4, 5]
    assert [type(r).__name__ for _, r in got] == ["dict", "InputError", "InputError", "InputError", "InputError", "dict"]
    assert "UTF-8" in str(got[1][1]) and "object" in str(got[2][1]) and "lacks" in str(got[3][1])


def test_paths_must_be_strings():
    try:
        parse_triple('{"instruction": "x", "source": 3, "edited": "b.png"}')
    except InputError as exc:
        assert "source must be a path string" in str(exc)
    else:
        raise AssertionError("a numeric source path was accepted")


def test_a_byte_order_mark_does_not_cost_line_0(tmp_path):
    record = {"instruction": "x", "source": "a.png", "edited": "b.png"}
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([json.dumps(record)] * 2) + "\n", encoding="utf-8-sig")  # as Notepad saves it
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_triples(path) == [(0, record), (1, record)]


def test_what_is_not_a_regular_file_is_named_as_what_it_is(tmp_path):
    """A FIFO would block the reader and /dev/zero never end: each is refused by its kind, at once."""
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    cases = {fifo: "not a regular file but a FIFO", Path("/dev/zero"): "not a regular file but a character device",
             tmp_path: "not a regular file but a directory", tmp_path / "none.jsonl": "no such file"}
    for path, message in cases.items():
        with pytest.raises(InputError, match=message):
            read_triples(path)
