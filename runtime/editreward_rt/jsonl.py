"""The one reader of JSONL triple files (CLI batches, Ray batch input, calibration, benchmarks).

A JSONL line ends at ``\\n`` only: characters that ``str.splitlines`` also breaks at (U+2028,
U+0085, a lone ``\\r``, ...) stay inside their line, so line numbers and indices agree with
what any JSONL tool counts. Each line is decoded on its own, so one line that is not UTF-8
costs that line only.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from pathlib import Path

from .errors import InputError

TRIPLE_FIELDS = ("instruction", "source", "edited")


def not_regular(path: Path) -> str | None:
    """None for a regular file (or a link to one), else what the path is: reading a FIFO or a
    device would block or never end, and "no such file" would misname them."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except (OSError, ValueError) as exc:  # ValueError: a path the OS refuses (a NUL byte)
        return f"cannot be read ({exc})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return "not a regular file but " + next((what for test, what in kinds if test(mode)), "a special file")


def read_lines(path: Path) -> list[bytes]:
    """The file's lines as bytes (line i is index i), without their ``\\n`` or a ``\\r`` before it.
    A UTF-8 byte-order mark (editors on Windows write one) is not part of line 0."""
    problem = not_regular(path)
    if problem is not None:
        raise InputError(f"{path}: {problem}")
    try:
        data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def is_blank(line: bytes) -> bool:
    return not line.strip()


def parse_record(line: bytes | str) -> dict:
    """One line -> its JSON object, or an ``InputError`` saying why not."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"line is not UTF-8 text: {exc}") from exc
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"line is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise InputError("line is not a JSON object")
    return record


def parse_triple(line: bytes | str) -> dict:
    """One line -> a record with the three fields and string image paths, or an ``InputError`` (the
    instruction itself is checked when the triple is prepared, as for any other caller)."""
    record = parse_record(line)
    missing = [f for f in TRIPLE_FIELDS if f not in record]
    if missing:
        raise InputError(f"line lacks {', '.join(missing)}")
    for field in ("source", "edited"):
        if not isinstance(record[field], str):
            raise InputError(f"{field} must be a path string")
    return record


def resolve(record: dict, base: Path) -> tuple:
    """(instruction, source path, edited path), paths relative to ``base`` (the file's folder)."""
    return record["instruction"], base / record["source"], base / record["edited"]


def read_triples(path: Path) -> list[tuple[int, dict | InputError]]:
    """(line index, record or the line's InputError) for every non-blank line."""
    out = []
    for i, line in enumerate(read_lines(path)):
        if is_blank(line):
            continue
        try:
            out.append((i, parse_triple(line)))
        except InputError as exc:
            out.append((i, exc))
    return out
