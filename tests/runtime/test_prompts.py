"""The instruction limit outside the server: an instruction too long for any prompt is refused by its
length, before the tokenizer sees it, with the same typed error as a prompt over the token limit."""

from __future__ import annotations

import time

import pytest
from editreward_rt.errors import PromptTooLongError
from editreward_rt.prompts import NFC_MAX_COMPOSED


@pytest.fixture(scope="module")
def scorer(fast):
    return fast  # the tiny checkpoint's Scorer: prompt building is the same on every backend


def test_a_50_mb_instruction_is_refused_before_tokenizing(scorer, images):
    huge = "word " * 10_000_000  # 50 MB: tokenizing it whole took minutes and gigabytes
    start = time.perf_counter()
    with pytest.raises(PromptTooLongError, match="characters, over the limit"):
        scorer.score(huge, images[0], images[1])
    assert time.perf_counter() - start < 2.0


def test_the_character_limit_refuses_nothing_that_fits(scorer, images):
    """Just under the character limit the instruction is tokenized and refused by its token count
    (or scored): the character bound never stands in for the token limit on text that could fit."""
    builder = scorer.builder
    limit = builder.max_instruction_chars
    assert limit >= builder.spec.max_prompt_tokens * NFC_MAX_COMPOSED
    with pytest.raises(PromptTooLongError, match="tokens, over the limit"):
        scorer.score("word " * (limit // 5), images[0], images[1])
    with pytest.raises(PromptTooLongError, match="characters, over the limit"):
        scorer.score("w" * (limit + 1), images[0], images[1])

