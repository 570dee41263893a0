"""Image fields as the gateway reads them: every base64 spelling a client sends decodes to the same
bytes, URLs and paths are refused, and plain base64 (what every client sends) skips the whitespace
scan, the cost the gateway's event loop pays for every image of a request."""

from __future__ import annotations

import base64
import json
import pickle
import re

import pytest

from editreward_rt.errors import ImageError
from editreward_rt.serve import schemas as S
from editreward_rt.serve.trainers import _decode_once

DATA = bytes(range(256)) * 64 + b"\xff\xfe"  # every byte value, and a length that needs padding


def _mime(text: str) -> str:
    """base64 as MIME and PEM write it: 76-character lines."""
    return "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"


SPELLINGS = {
    "standard": base64.b64encode(DATA).decode(),
    "unpadded": base64.b64encode(DATA).decode().rstrip("="),
    "url-safe": base64.urlsafe_b64encode(DATA).decode(),
    "data uri": "data:image/png;base64," + base64.b64encode(DATA).decode(),
    "mime lines": _mime(base64.b64encode(DATA).decode()),
    "spaced url-safe": " ".join(base64.urlsafe_b64encode(DATA).decode().rstrip("=")),
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_every_base64_spelling_decodes_to_the_bytes(name):
    assert S.decode_image_field(SPELLINGS[name], "source") == DATA


@pytest.mark.parametrize("value, error", [
    ("https://example.com/cat.png", S.ImageSourceError),
    ("images/cat.png", S.ImageSourceError),
    ("C:\\images\\cat.png", S.ImageSourceError),
    ("~/cat.png", S.ImageSourceError),
    ("", ImageError),
    (" \n\t", ImageError),
    ("not*base64!", ImageError),
    ("====", ImageError),
    (b"", ImageError),
    (3, S.ApiError),
])
def test_urls_paths_and_bad_text_are_typed_errors(value, error):
    with pytest.raises(error):
        S.decode_image_field(value, "source")


class _CountingPattern:
    """The module's whitespace pattern, counting the texts it scans."""

    def __init__(self, pattern: re.Pattern):
        self.pattern, self.scanned = pattern, 0

    def sub(self, repl, text):
        self.scanned += 1
        return self.pattern.sub(repl, text)


def test_plain_base64_skips_the_whitespace_scan(monkeypatch):
    counting = _CountingPattern(S._WHITESPACE)
    monkeypatch.setattr(S, "_WHITESPACE", counting)
    for name in ("standard", "unpadded", "url-safe", "data uri"):
        assert S.decode_image_field(SPELLINGS[name], name) == DATA
    assert counting.scanned == 0
    assert S.decode_image_field(SPELLINGS["mime lines"], "mime") == DATA
    assert counting.scanned == 1


def test_a_unirl_source_repeated_per_edit_is_decoded_to_one_object():
    """UniRL repeats the source's base64 in every edit's history; json.loads gives each its own
    str. Decoded once, the triples share one bytes object, and Ray's pickle carries it once."""
    edits = [base64.b64encode(DATA + bytes([i])).decode() for i in range(8)]
    body = json.dumps({"requests": [{"history": [{"image_b64": SPELLINGS["standard"]}, {"image_b64": e}]}
                                    for e in edits]})
    items = json.loads(body)["requests"]
    assert len({id(item["history"][0]["image_b64"]) for item in items}) == 8
    decoded = {}
    triples = [tuple(_decode_once(turn["image_b64"], "f", decoded) for turn in item["history"]) for item in items]
    assert all(source == DATA for source, _ in triples) and len({id(source) for source, _ in triples}) == 1
    assert [edit for _, edit in triples] == [DATA + bytes([i]) for i in range(8)]
    one_source = len(DATA) * 9  # the source and 8 edits
    assert one_source <= len(pickle.dumps(triples)) < one_source + 4096


def test_a_bad_repeated_string_fails_every_item_it_is_in():
    decoded = {}
    for i in range(3):
        with pytest.raises(ImageError, match=f"requests\\[{i}\\]"):
            _decode_once("not*base64!", f"requests[{i}].history[0].image_b64", decoded)
    assert decoded == {}
