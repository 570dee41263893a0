"""Random-weight EditReward fixtures in the published upstream layout.

The real model is a 7B Qwen2.5-VL plus two float32 reward heads; tests never have it.
``write_fixture`` writes a small stand-in with the same file layout and key names:

    out_dir/base/                      like Qwen/Qwen2.5-VL-7B-Instruct (config, tokenizer, preprocessor)
    out_dir/checkpoint/                like an EditReward checkpoint (safetensors + editreward.yaml)
    out_dir/prompts/EditReward/dataset like the two upstream files holding the rubric constants

Weights come from numpy only and depend on nothing but ``size`` and ``seed``, so two runs
with the same arguments write byte-identical files. The tokenizer is trained from a fixed
built-in corpus and is the same for every seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

# Qwen2 special tokens, appended in this order right after the learned vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Same splitting as Qwen2's pre-tokenizer: English contractions, letter runs (with one
# leading non-letter), single digits, punctuation runs, newlines, and other whitespace.
SPLIT_REGEX = (
    r"(?i:'(?:s|t|re|ve|m|ll|d))"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# Renders like Qwen2-VL's template: default system turn, image/video placeholders, text parts.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

HEAD_WIDTHS = (1024, 16, 2)  # rm_heads.head_k Linear outputs at Sequential indices 0, 3, 5
HEAD_INDICES = (0, 3, 5)
NUM_HEADS = 2
PATCH = 14
TEMPORAL_PATCH = 2
MERGE = 2
IN_CHANNELS = 3
VOCAB_PAD = 64  # Qwen pads the config vocab_size (not the checkpoint) to a multiple of this


@dataclass(frozen=True)
class FixtureSize:
    """Every dimension of one fixture size; all files are derived from this."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    mrope_section: tuple[int, int, int]
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    fullatt: tuple[int, ...]
    bpe_vocab: int  # learned BPE vocabulary, 256 byte symbols included
    vocab_rows: int | None = None  # embedding rows to reach with unused filler tokens (None: what BPE learned)
    rubric_tokens: int | None = None  # rubric length to reach (None: the short placeholder rubrics)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SIZES = {
    "tiny": FixtureSize(64, 2, 4, 2, 128, (2, 3, 3), 32, 2, 2, 64, (1,), 500),
    "small": FixtureSize(512, 6, 8, 2, 1408, (8, 12, 12), 256, 4, 4, 512, (1, 3), 2000),
    # Qwen2.5-VL-7B's published shapes (``published``): 151,666 embedding rows, rubrics of the real length.
    "full": FixtureSize(3584, 28, 28, 4, 18944, (16, 24, 24), 1280, 32, 16, 3420, (7, 15, 23, 31), 2000,
                        vocab_rows=151666, rubric_tokens=400),
}
# Per-size defaults of write_fixture: the full size is written as published, bf16 in shards of about 4 GB.
DEFAULT_FORMAT = {"tiny": ("safetensors", "float32"), "small": ("safetensors", "float32"), "full": ("sharded", "bfloat16")}
SHARD_BYTES = 4 * 2**30


@dataclass(frozen=True)
class FixturePaths:
    root: Path
    base: Path
    checkpoint: Path
    prompts: Path  # folder holding EditReward/dataset/{prompts,data_collator_qwen_edit}.py
    yaml: Path


def write_fixture(
    out_dir,
    size: str = "tiny",
    seed: int = 0,
    *,
    weight_format: str | None = None,
    dtype: str | None = None,
) -> FixturePaths:
    """Write base model folder, checkpoint, yaml and rubric files under ``out_dir``. Weights are
    drawn and written one tensor at a time, so memory holds at most the largest tensor."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    weight_format = weight_format or DEFAULT_FORMAT[size][0]
    dtype = dtype or DEFAULT_FORMAT[size][1]
    if weight_format not in ("safetensors", "sharded"):
        raise ValueError(f"weight_format must be 'safetensors' or 'sharded', got {weight_format!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    dims = SIZES[size]
    root = Path(out_dir)
    paths = FixturePaths(root, root / "base", root / "checkpoint", root / "prompts", root / "checkpoint" / "editreward.yaml")
    for folder in (paths.base, paths.checkpoint):
        folder.mkdir(parents=True, exist_ok=True)

    # The checkpoint embedding was resized to len(tokenizer) after adding <|Reward|>.
    token_ids = write_tokenizer(paths.base, dims.bpe_vocab, None if dims.vocab_rows is None else dims.vocab_rows - 1)
    n_tokens = len(token_ids["vocab"])
    _write_json(paths.base / "config.json", base_config(dims, token_ids, n_tokens))
    _write_json(paths.base / "preprocessor_config.json", preprocessor_config())

    tensors = ((name, _cast_one(name, arr, dtype)) for name, arr in iter_tensors(dims, vocab_rows=n_tokens + 1, seed=seed))
    # The full size is never held whole: files stream tensor by tensor.
    write_weights(paths.checkpoint, tensors, weight_format, stream=dims.vocab_rows is not None)
    paths.yaml.write_text(editreward_yaml(), encoding="utf-8")
    rubrics = _PROMPTS_PY if dims.rubric_tokens is None else long_prompts_py(paths.base / "tokenizer.json", dims.rubric_tokens)
    write_prompt_files(paths.prompts, rubrics)
    return paths


# ---------------------------------------------------------------- tokenizer


def training_corpus() -> list[str]:
    """Fixed English sentences about image edits; seed-independent so all fixtures share a tokenizer."""
    rng = np.random.default_rng(20240611)
    verbs = ["replace", "remove", "add", "change", "make", "turn", "move", "paint", "erase", "put"]
    adjectives = ["red", "blue", "green", "small", "large", "bright", "dark", "old", "new", "wooden",
                  "yellow", "white", "black", "shiny", "quiet", "happy", "sunny", "rainy", "soft", "tall"]
    nouns = ["car", "dog", "cat", "house", "tree", "sky", "person", "bicycle", "table", "window",
             "mountain", "river", "flower", "hat", "boat", "chair", "bird", "road", "lamp", "cloud",
             "image", "picture", "photo", "background", "edit", "instruction", "quality", "score"]
    links = ["with", "into", "next to", "behind", "in front of", "on top of", "near", "under"]
    extras = ["Please provide the overall ratings of this image.", "The edited image looks natural.",
              "Text instruction - ", "Don't change anything else; it's fine.", "We'll see what they've done!",
              "Rate it from 1 to 10: 7, 8, or 9?", "(keep the lighting) and [the shadows] consistent."]
    # Made-up place names from syllables give BPE enough distinct words to fill ~2000 merges.
    syllables = [c + v for c in "bdfghklmnprstvwz" for v in "aeiou"] + ["str", "ch", "sh", "th", "qu", "ng"]
    lines = []
    for _ in range(8000):
        v, a1, n1, l, a2, n2 = (rng.choice(x) for x in (verbs, adjectives, nouns, links, adjectives, nouns))
        place = "".join(rng.choice(syllables, size=rng.integers(2, 5))).capitalize()
        lines.append(f"{v.capitalize()} the {a1} {n1} {l} a {a2} {n2} in {place}. It has {rng.integers(0, 100)} parts.")
    lines.extend(extras * 40)
    return lines


def _train_bpe(bpe_vocab: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Offsets only; adds no BOS/EOS, like Qwen2's tokenizer.json.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok


def _pad_vocab(tok, rows: int):
    """``tok`` with unused filler entries appended to its BPE vocabulary up to ``rows`` ids: no merge
    produces them, so tokenization is unchanged while the ids (and the embedding) reach full size."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) > rows:
        raise ValueError(f"the trained vocabulary ({len(vocab)}) is larger than the {rows} ids asked for")
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), rows)})
    return Tokenizer.from_str(json.dumps(data))


def write_tokenizer(base: Path, bpe_vocab: int, n_tokens: int | None = None) -> dict:
    """Write tokenizer.json, tokenizer_config.json and chat_template.json; return token ids.
    ``n_tokens``: the tokenizer's length, special tokens included (None: as trained)."""
    from tokenizers import AddedToken

    tok = _train_bpe(bpe_vocab)
    if n_tokens is not None:
        tok = _pad_vocab(tok, n_tokens - len(SPECIAL_TOKENS))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(base / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t: vocab[t] for t in SPECIAL_TOKENS}
    _write_json(base / "tokenizer_config.json", tokenizer_config(special))
    _write_json(base / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return {"vocab": vocab, "special": special}


def tokenizer_config(special: dict[str, int]) -> dict:
    decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in special.items()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---------------------------------------------------------------- configs


def base_config(dims: FixtureSize, token_ids: dict, n_tokens: int) -> dict:
    """Flat config.json as published for Qwen2.5-VL-7B-Instruct, scaled down."""
    special = token_ids["special"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "vision_start_token_id": special["<|vision_start|>"],
        "vision_end_token_id": special["<|vision_end|>"],
        "vision_token_id": special["<|vision_pad|>"],
        "image_token_id": special["<|image_pad|>"],
        "video_token_id": special["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": dims.hidden,
        "initializer_range": 0.02,
        "intermediate_size": dims.intermediate,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": dims.heads,
        "num_hidden_layers": dims.layers,
        "num_key_value_heads": dims.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": dims.vision_depth,
            "hidden_act": "silu",
            "hidden_size": dims.vision_hidden,
            "intermediate_size": dims.vision_intermediate,
            "num_heads": dims.vision_heads,
            "in_chans": IN_CHANNELS,
            "out_hidden_size": dims.hidden,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "spatial_patch_size": PATCH,
            "window_size": 112,
            "fullatt_block_indexes": list(dims.fullatt),
            "tokens_per_second": 2,
            "temporal_patch_size": TEMPORAL_PATCH,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(dims.mrope_section)},
        "vocab_size": -(-n_tokens // VOCAB_PAD) * VOCAB_PAD,
    }


def preprocessor_config() -> dict:
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL_PATCH,
        "merge_size": MERGE,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
    }


def editreward_yaml() -> str:
    """Flat training yaml as upstream writes it; model path relative to the yaml's folder."""
    return """\
# EditReward training configuration (test fixture)
model_name_or_path: ../base
rm_head_type: ranknet_multi_head
pooling_strategy: mean
output_dim: 2
use_special_tokens: true
reward_token: special
max_pixels: 200704
min_pixels: 200704
bf16: true
torch_dtype: bfloat16
lora_enable: false
freeze_vision_tower: false
learning_rate: 2.0e-06
num_train_epochs: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
warmup_ratio: 0.05
lr_scheduler_type: cosine
gradient_checkpointing: true
output_dir: ./outputs/editreward_fixture
"""


# ---------------------------------------------------------------- weights


CHUNK = 1 << 24  # values drawn at a time: the same stream as one draw, without a second full-size copy


def _normal(rng: np.random.Generator, shape: Sequence[int], std: float) -> np.ndarray:
    out = np.empty(int(np.prod(shape)), np.float32)
    for start in range(0, out.size, CHUNK):
        part = out[start:start + CHUNK]
        rng.standard_normal(out=part, dtype=np.float32)
        part *= np.float32(std)
    return out.reshape(shape)


def _linear(rng, out_f: int, in_f: int, bias: bool, gain: float = 1.0) -> dict[str, np.ndarray]:
    # std gain/sqrt(fan_in): keeps activations O(1) at every width (a flat 0.02 would shrink them).
    out = {"weight": _normal(rng, (out_f, in_f), gain / math.sqrt(in_f))}
    if bias:
        out["bias"] = _normal(rng, (out_f,), 0.02)
    return out


def _norm(rng, dim: int) -> np.ndarray:
    return 1.0 + _normal(rng, (dim,), 0.02)


def _prefixed(prefix: str, parts: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    for name, arr in parts.items():
        yield f"{prefix}.{name}", arr


def _vision_tensors(rng, d: FixtureSize) -> Iterator[tuple[str, np.ndarray]]:
    vh, vi = d.vision_hidden, d.vision_intermediate
    patch_in = IN_CHANNELS * TEMPORAL_PATCH * PATCH * PATCH
    # Conv3d weight [vh, 3, 2, 14, 14], no bias.
    yield "model.visual.patch_embed.proj.weight", _normal(rng, (vh, IN_CHANNELS, TEMPORAL_PATCH, PATCH, PATCH), 1 / math.sqrt(patch_in))
    for i in range(d.vision_depth):
        p = f"model.visual.blocks.{i}"
        yield f"{p}.norm1.weight", _norm(rng, vh)
        yield f"{p}.norm2.weight", _norm(rng, vh)
        yield from _prefixed(f"{p}.attn.qkv", _linear(rng, 3 * vh, vh, True))
        yield from _prefixed(f"{p}.attn.proj", _linear(rng, vh, vh, True))
        yield from _prefixed(f"{p}.mlp.gate_proj", _linear(rng, vi, vh, True))
        yield from _prefixed(f"{p}.mlp.up_proj", _linear(rng, vi, vh, True))
        yield from _prefixed(f"{p}.mlp.down_proj", _linear(rng, vh, vi, True))
    merged = vh * MERGE * MERGE  # 2x2 patches concatenated
    yield "model.visual.merger.ln_q.weight", _norm(rng, vh)
    yield from _prefixed("model.visual.merger.mlp.0", _linear(rng, merged, merged, True))
    yield from _prefixed("model.visual.merger.mlp.2", _linear(rng, d.hidden, merged, True))


def _text_tensors(rng, d: FixtureSize, vocab_rows: int) -> Iterator[tuple[str, np.ndarray]]:
    H, I, hd = d.hidden, d.intermediate, d.head_dim
    q_dim, kv_dim = d.heads * hd, d.kv_heads * hd
    # Unit-scale embeddings so token identity is not swamped by the first residual additions.
    yield "model.language_model.embed_tokens.weight", _normal(rng, (vocab_rows, H), 1.0)
    for i in range(d.layers):
        p = f"model.language_model.layers.{i}"
        yield from _prefixed(f"{p}.self_attn.q_proj", _linear(rng, q_dim, H, True))
        yield from _prefixed(f"{p}.self_attn.k_proj", _linear(rng, kv_dim, H, True))
        yield from _prefixed(f"{p}.self_attn.v_proj", _linear(rng, kv_dim, H, True))
        yield from _prefixed(f"{p}.self_attn.o_proj", _linear(rng, H, q_dim, False))
        yield from _prefixed(f"{p}.mlp.gate_proj", _linear(rng, I, H, False))
        yield from _prefixed(f"{p}.mlp.up_proj", _linear(rng, I, H, False))
        yield from _prefixed(f"{p}.mlp.down_proj", _linear(rng, H, I, False))
        yield f"{p}.input_layernorm.weight", _norm(rng, H)
        yield f"{p}.post_attention_layernorm.weight", _norm(rng, H)
    yield "model.language_model.norm.weight", _norm(rng, H)
    yield from _prefixed("lm_head", _linear(rng, vocab_rows, H, False))


def _head_tensors(rng, d: FixtureSize) -> Iterator[tuple[str, np.ndarray]]:
    for k in range(NUM_HEADS):
        in_f = d.hidden
        for idx, out_f in zip(HEAD_INDICES, HEAD_WIDTHS):
            # He gain ahead of the ReLUs so mu/log_sigma vary visibly between inputs.
            gain = math.sqrt(2.0) if idx != HEAD_INDICES[-1] else 1.0
            yield from _prefixed(f"rm_heads.head_{k}.{idx}", _linear(rng, out_f, in_f, True, gain))
            in_f = out_f


def iter_tensors(dims: FixtureSize, vocab_rows: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """The float32 reward-model tensors one at a time, drawn in a fixed order from one seeded generator."""
    rng = np.random.default_rng(seed)
    for gen in (_vision_tensors(rng, dims), _text_tensors(rng, dims, vocab_rows), _head_tensors(rng, dims)):
        yield from gen


def state_dict(dims: FixtureSize, vocab_rows: int, seed: int) -> dict[str, np.ndarray]:
    """Full float32 reward-model state dict (``iter_tensors``)."""
    return dict(iter_tensors(dims, vocab_rows, seed))


def _cast_one(name: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """Cast everything but the reward heads (always float32, as upstream keeps them)."""
    if dtype == "float32" or name.startswith("rm_heads."):
        return arr
    import ml_dtypes  # safetensors.numpy writes ml_dtypes.bfloat16 arrays as BF16

    return arr.astype(ml_dtypes.bfloat16)


HEADER_RESERVE = 1 << 20  # bytes kept for a streamed shard's JSON header (about 120 bytes per tensor)
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


class _ShardWriter:
    """One safetensors file written tensor by tensor: data after a reserved header, which is filled
    in (padded with spaces, as the format allows) when the file is closed."""

    def __init__(self, path: Path):
        self.path, self.header, self.offset = path, {}, 0
        self.file = open(path, "wb")
        self.file.seek(8 + HEADER_RESERVE)

    def add(self, name: str, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr)
        self.header[name] = {"dtype": ST_DTYPES[str(data.dtype)], "shape": list(data.shape),
                             "data_offsets": [self.offset, self.offset + data.nbytes]}
        self.file.write(memoryview(data.reshape(-1).view(np.uint8)))
        self.offset += data.nbytes

    def close(self) -> None:
        text = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        if len(text) > HEADER_RESERVE:
            raise ValueError(f"{self.path}: {len(self.header)} tensors need a header over {HEADER_RESERVE} bytes")
        self.file.seek(0)
        self.file.write(len(text.ljust(HEADER_RESERVE)).to_bytes(8, "little") + text.ljust(HEADER_RESERVE))
        self.file.close()


def _stream_shards(folder: Path, tensors, budget: int, max_shards: int) -> None:
    """Shards of about ``budget`` bytes in tensor order (at most ``max_shards``), renamed to
    ``model-0000i-of-0000n`` once n is known, plus the index transformers reads."""
    shards: list[_ShardWriter] = []
    for name, arr in tensors:
        if not shards or (shards[-1].header and shards[-1].offset + arr.nbytes > budget and len(shards) < max_shards):
            if shards:
                shards[-1].close()
            shards.append(_ShardWriter(folder / f".shard-{len(shards) + 1}.partial"))
        shards[-1].add(name, arr)
    shards[-1].close()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        final = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard.path.rename(final)
        weight_map.update({k: final.name for k in shard.header})
    total = sum(s.offset for s in shards)
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_weights(folder: Path, tensors, weight_format: str, n_shards: int = 3, stream: bool = False) -> None:
    """``tensors``, (name, array) pairs, as one ``model.safetensors``, as ``n_shards`` shards of
    equal size (held in memory to measure them), or with ``stream`` as shards of ``SHARD_BYTES``
    written one tensor at a time."""
    from safetensors.numpy import save_file

    if weight_format == "safetensors" and stream:
        writer = _ShardWriter(folder / "model.safetensors")
        for name, arr in tensors:
            writer.add(name, arr)
        writer.close()
    elif weight_format == "safetensors":
        save_file(dict(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif stream:
        _stream_shards(folder, tensors, SHARD_BYTES, max_shards=99999)
    else:
        tensors = list(tensors)
        _stream_shards(folder, tensors, -(-sum(arr.nbytes for _, arr in tensors) // n_shards), n_shards)


# ---------------------------------------------------------------- rubric files

# Placeholder rubrics written for tests; the two used ones share their opening lines.
_PROMPTS_PY = '''"""Rubric prompts for the edit reward model (test fixture, placeholder wording)."""

INSTRUCTION_EDIT_FOLLOWING = """
You compare a source picture with an edited version of it.
Both pictures are shown above, source first.
Decide how completely the edit carries out the request below.
Ignore how pretty the result is.
Text instruction - {text_prompt}
"""

INSTRUCTION_EDIT_QUALITY = """
You compare a source picture with an edited version of it.
Both pictures are shown above, source first.
Decide how clean and believable the edited picture looks.
Ignore whether the request was met.
Text instruction - {text_prompt}
"""

INSTRUCTION_EDIT_OVERALL = """
Give one overall mark for the edited picture.
Weigh the request and the look of the result equally.
Text instruction - {text_prompt}
"""

INSTRUCTION_EDIT_OVERALL_DETAILED = """
Give one overall mark for the edited picture.
First list what changed, then what should have changed.
Then note any visible flaws before giving the mark.
Text instruction - {text_prompt}
"""
'''

_COLLATOR_PY = '''"""Batch collation for pairwise edit comparisons (test fixture)."""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

prompt_with_special_token = """
Please provide the overall ratings of this image: <|Reward|>

END
"""

prompt_without_special_token = """
Please provide the overall ratings of this image: 
"""


@dataclass
class QwenEditDataCollator:
    processor: object
    max_length: Optional[int] = None
    use_special_tokens: bool = True

    def __call__(self, features: List[Dict]) -> Dict[str, torch.Tensor]:
        suffix = prompt_with_special_token if self.use_special_tokens else prompt_without_special_token
        texts = [f["instruction"] + suffix for f in features]
        return self.processor(text=texts, padding=True, return_tensors="pt")
'''


# Rubric criteria for the full size's long rubrics: placeholder wording, as long as the real rubrics.
_CRITERIA = (
    "Check that every object named in the request is present where the request puts it.",
    "Check that nothing outside the requested region has moved, changed colour or disappeared.",
    "Look for seams, halos or smudges along the borders of the edited region.",
    "Compare the lighting of the edited region with the light falling on the rest of the picture.",
    "Compare shadows and reflections with the positions of the light sources in the scene.",
    "Check that textures such as wood, cloth, fur and water keep their grain after the edit.",
    "Check that text in the picture, if any, stays readable and is not garbled by the edit.",
    "Check that faces, hands and bodies keep natural proportions and a plausible pose.",
    "Check that perspective and scale of added objects match the surrounding scene.",
    "Look for repeated patterns, duplicated objects or missing parts that the request did not ask for.",
    "Judge whether colours are saturated as in the source or washed out by the edit.",
    "Judge whether the sharpness of the edited region matches the sharpness of the rest.",
    "Note any noise, blocking or banding that appears only after the edit.",
    "Decide whether a careful viewer would notice that the picture was edited at all.",
)


def _rubric(opening: tuple[str, ...], criteria: tuple[str, ...], count: int) -> str:
    lines = [*opening, *(f"{i + 1}. {criteria[i % len(criteria)]}" for i in range(count)), "Text instruction - {text_prompt}"]
    return "\n" + "\n".join(lines) + "\n"


def long_prompts_py(tokenizer_json: Path, tokens: int) -> str:
    """``prompts.py`` with rubrics of at least ``tokens`` tokens under the fixture tokenizer (the real
    rubrics are about 400 tokens; the two used ones share their opening lines)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    opening = ("You compare a source picture with an edited version of it.", "Both pictures are shown above, source first.")
    rubrics = {}
    for name, extra, start in (("INSTRUCTION_EDIT_FOLLOWING", "Decide how completely the edit carries out the request below.", 0),
                               ("INSTRUCTION_EDIT_QUALITY", "Decide how clean and believable the edited picture looks.", 2)):
        criteria = _CRITERIA[start:] + _CRITERIA[:start]
        count = 1
        while len(tok.encode(_rubric(opening + (extra,), criteria, count)).ids) < tokens:
            count += 1
        rubrics[name] = _rubric(opening + (extra,), criteria, count)
    body = "".join(f'\n{name} = """{text}"""\n' for name, text in rubrics.items())
    return '"""Rubric prompts for the edit reward model (full-size test fixture, placeholder wording)."""\n' + body


def write_prompt_files(prompts_root: Path, prompts_py: str = _PROMPTS_PY) -> None:
    folder = prompts_root / "EditReward" / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.py").write_text(prompts_py, encoding="utf-8")
    (folder / "data_collator_qwen_edit.py").write_text(_COLLATOR_PY, encoding="utf-8")


# ---------------------------------------------------------------- helpers


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
