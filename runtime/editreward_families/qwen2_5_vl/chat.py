"""Chat rendering and prompt assembly for Qwen2.5-VL: each image is one ``<|image_pad|>`` in the
rendered template, expanded to the image's merged token count as the Qwen2.5-VL processor does."""

from __future__ import annotations

import numpy as np
from editreward_rt.errors import CheckpointError, InstructionError, PromptTooLongError
from editreward_rt.prompts import (TEXT_SENTINEL, Prompt, check_instruction, max_instruction_chars, render_messages,
                                  reserved_tokens)
from editreward_rt.templates import Templates

from .spec import ModelSpec

IMAGE_PAD = "<|image_pad|>"


def render_chat_template(template: str) -> str:
    """Render the base chat template for [image, image, text] with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": TEXT_SENTINEL}]}]
    rendered = render_messages(template, messages)
    if rendered.count(TEXT_SENTINEL) != 1 or rendered.split(TEXT_SENTINEL)[0].count(IMAGE_PAD) != 2:
        raise CheckpointError("the chat template does not render one text part and two image placeholders")
    return rendered


class PromptBuilder:
    def __init__(self, tokenizer, chat_text: str, templates: Templates, spec: ModelSpec):
        self.tokenizer = tokenizer
        self.templates = templates
        self.spec = spec
        self.before, self.after = chat_text.split(TEXT_SENTINEL)
        self.reserved = reserved_tokens(tokenizer)
        self.max_instruction_chars = max_instruction_chars(tokenizer, spec.max_prompt_tokens)

    def check_instruction(self, instruction) -> str:
        return check_instruction(instruction, self.reserved, self.max_instruction_chars)

    def build(self, instruction: str, n_source: int, n_edited: int) -> list[Prompt]:
        """One prompt per head; ``n_source``/``n_edited`` are the images' merged token counts."""
        instruction = self.check_instruction(instruction)
        start, middle, end = self.before.split(IMAGE_PAD)
        head = start + IMAGE_PAD * n_source + middle + IMAGE_PAD * n_edited + end
        prompts = []
        for k in range(len(self.templates.rubrics)):
            text = head + self.templates.rubric_text(k, instruction) + self.after
            ids = np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)
            reward = np.flatnonzero(ids == self.spec.tokens.reward)
            if len(reward) != 1:
                raise InstructionError(f"prompt for head {k} holds {len(reward)} <|Reward|> tokens, expected 1")
            if len(ids) > self.spec.max_prompt_tokens:
                raise PromptTooLongError(
                    f"prompt for head {k} is {len(ids)} tokens, over the limit of {self.spec.max_prompt_tokens}"
                )
            prompts.append(Prompt(ids, int(reward[0]), image_spans(ids, self.spec.tokens.image_pad, n_source, n_edited)))
        return prompts


def image_spans(ids: np.ndarray, image_pad: int, *counts: int) -> tuple[tuple[int, int], ...]:
    """Where the builder's image pads landed: (first position, count) of each image's run, in order.
    The template puts each image's pads in one run, so the runs must match the images' token counts."""
    pads = np.flatnonzero(ids == image_pad)
    runs = np.split(pads, np.flatnonzero(np.diff(pads) > 1) + 1) if len(pads) else []
    spans = tuple((int(run[0]), len(run)) for run in runs)
    if tuple(n for _, n in spans) != counts:
        raise InstructionError(f"the prompt's image runs {spans} do not hold the images' {counts} tokens")
    return spans
