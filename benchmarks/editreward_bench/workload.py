"""The GPU scripts' workload: the published 7B's sizes with random weights made in memory on the
device, rubric prompts of the real length and photo-sized images, and the arithmetic that says
how much memory a variant of that model needs before anything is built.

The real prompt is ~926 tokens per rubric pass, 522 of them shared by the two passes (chat turn
and two 256-token images): each rubric pass adds ~400 tokens of its own. Without that length the
fast path's shared-prefix saving, and so its speed-up, is not what the real model sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RUBRIC_TOKENS = 400  # tokens of one rubric pass after the shared prefix: rubric, instruction, reward suffix
IMAGE_SIDE = 448  # 448 x 448 pixels = the published min = max pixels (200704): 32 x 32 patches, 16 x 16 = 256 tokens
GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Placeholder rubric wording (the real rubrics are model data, never part of this project).
_SENTENCES = ("Judge the edited picture against the source picture and the instruction.",
              "Consider whether the requested change is present and complete.",
              "Check whether anything else in the picture changed without being asked for.",
              "Look at edges, lighting, shadows and textures for visible flaws.")
_OPENINGS = ("Instruction following: rate how well the edit carries out the request.",
             "Visual quality: rate how clean and believable the edited picture looks.")
_REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


class InMemoryCheckpoint:
    """Quacks like editreward_rt.checkpoint.Checkpoint, its weights made on the device."""

    def __init__(self, base, spec, config, state, templates=None):
        self.spec, self.config, self._state = spec, config, state
        self.tokenizer, self.chat_text = base.tokenizer, base.chat_text
        self.templates = templates or base.templates

    def state_dict(self):
        return self._state

    def release_weights(self) -> None:
        """Drop the drawn weights once a backend has built its modules from them (they hold a copy)."""
        self._state = {}


def long_rubrics(tokenizer, tokens: int = RUBRIC_TOKENS, heads: int = 2, instruction: str = "Add a green bowl on the branch"):
    """Rubric templates whose pass, formatted with ``instruction`` and the reward suffix, is about
    ``tokens`` tokens of ``tokenizer`` long. Each head's rubric opens differently, so the two passes
    share only the chat turn and the images, as the real ones do."""
    from editreward_rt.templates import Templates

    words = " ".join(_SENTENCES).split()
    template = lambda text: f"\n{text}\nText instruction - {{text_prompt}}\n"
    count = lambda text: len(tokenizer.encode(template(text).format(text_prompt=instruction) + _REWARD_SUFFIX).ids)
    rubrics = []
    for head in range(heads):
        body, i = _OPENINGS[head % len(_OPENINGS)], 0
        while count(body) < tokens:  # a word at a time: within a word's tokens of the length asked for
            body += " " + words[i % len(words)]
            i += 1
        rubrics.append((f"rubric_{head}", template(body)))
    return Templates(tuple(rubrics), _REWARD_SUFFIX, f"editreward_bench.workload.long_rubrics({tokens})")


def prompt_lengths(prepared) -> dict:
    """Tokens per rubric pass of one prepared triple, and how many of them the passes share."""
    ids = [list(p.ids) for p in prepared.prompts]
    shared = next((i for i, tokens in enumerate(zip(*ids)) if len(set(tokens)) > 1), min(map(len, ids)))
    return {"per_pass": [len(i) for i in ids], "shared": shared}


def workload_triples(sources: int = 4, edits: int = 2, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``sources`` x ``edits`` triples of 448 x 448 images (256 tokens each), sources interleaved
    (s0e0, s1e0, ..., s0e1, ...): the first n triples mix min(n, sources) sources, so a batch
    measures batching, not only the sharing of one source's prefix by its edits."""
    from .common import INSTRUCTIONS

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE] / IMAGE_SIDE

    def image():  # smooth colour gradients plus noise: resizing and patching see real content
        base = np.stack([xx, yy, xx * yy], axis=-1) * rng.uniform(120, 230, 3)
        return (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)

    groups = [(INSTRUCTIONS[s % len(INSTRUCTIONS)], image(), [image() for _ in range(edits)]) for s in range(sources)]
    return [(instruction, source, edited[e]) for e in range(edits) for instruction, source, edited in groups]


def tiny_base(workdir: Path):
    """The tiny fixture's checkpoint: its tokenizer, chat template and config are the full model's too.
    Written once per ``workdir`` (the prompt files come last, so their presence means complete)."""
    from editreward_rt.checkpoint import open_checkpoint
    from editreward_rt.families import DEFAULT_FAMILY, family

    root = Path(workdir) / "tiny"
    if not (root / "prompts" / "EditReward" / "dataset" / "data_collator_qwen_edit.py").is_file():
        family(DEFAULT_FAMILY).write_fixture(root, size="tiny")
    return open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")


def workload_spec(base, size: str, small_vocab: bool = False):
    """``base``'s spec (``tiny``) or the published 7B's over ``base``'s tokens (``full``). ``small_vocab``:
    embedding rows = the fixture tokenizer's, not the 7B's 151666 (an exported folder checks that tokenizer
    and embedding agree; that leaves out ~1 GiB of bf16 weights)."""
    if size == "tiny":
        return base.spec
    vocab = {"vocab_size": base.spec.text.vocab_size} if small_vocab else {}
    return _published(base.spec).full_spec(base.spec, **vocab)


def _published(spec):
    from editreward_rt.families import family

    return family(spec.family).PUBLISHED


def make_checkpoint(size: str, device: str, dtype: str, workdir: Path, small_vocab: bool = False, host: bool = False):
    """The workload's model: ``tiny`` (the fixture's weights) or ``full`` (the 7B's sizes, random
    weights drawn on ``device`` in ``dtype``: the same numbers in every dtype up to rounding; kept on
    the host with ``host``, for the CPU-side ONNX export), both with rubrics of the real length."""
    import torch

    base = tiny_base(workdir)
    templates = long_rubrics(base.tokenizer)
    if size == "tiny":
        return InMemoryCheckpoint(base, base.spec, base.config, base.state_dict(), templates)
    published, spec = _published(base.spec), workload_spec(base, size, small_vocab)
    state = published.random_state(spec, device, getattr(torch, dtype))
    if host:
        state = {k: v.cpu() for k, v in state.items()}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return InMemoryCheckpoint(base, spec, published.full_config(base.config, spec), state, templates)


def weight_bytes(spec, dtype: str) -> int:
    """Bytes of a model's weights in ``dtype`` (the reward heads stay float32, as upstream)."""
    from editreward_rt.families import family_for

    fam = family_for(spec)
    heads = lambda name: name.startswith("rm_heads")
    return sum(int(np.prod(shape)) * (4 if heads(name) else DTYPE_BYTES[dtype]) for name, shape in fam.expected_shapes().items())


def device_memory_estimate_gib(spec, dtype: str, batch: int = 8, tokens: int = 1000) -> float:
    """GPU memory one torch variant needs at ``batch`` triples: the drawn state dict and the
    modules built from it both hold the weights (2x), plus activations (per token and sequence: a
    few hidden-width and one intermediate-width tensor, in float32 at the heads) and ~1 GiB of
    CUDA context and allocator slack. Meant to refuse what cannot fit, not to predict the peak."""
    t = spec.text
    width = DTYPE_BYTES[dtype]
    sequences = 2 * batch  # one per rubric pass
    activations = sequences * tokens * (8 * t.hidden_size + 2 * t.intermediate_size) * width
    return (2 * weight_bytes(spec, dtype) + activations) / GiB + 1.0
