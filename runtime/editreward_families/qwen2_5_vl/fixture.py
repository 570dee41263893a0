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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SIZES = {
    "tiny": FixtureSize(64, 2, 4, 2, 128, (2, 3, 3), 32, 2, 2, 64, (1,), 500),
    "small": FixtureSize(512, 6, 8, 2, 1408, (8, 12, 12), 256, 4, 4, 512, (1, 3), 2000),
}


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
    weight_format: str = "safetensors",
    dtype: str = "float32",
) -> FixturePaths:
    """Write base model folder, checkpoint, yaml and rubric files under ``out_dir``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if weight_format not in ("safetensors", "sharded"):
        raise ValueError(f"weight_format must be 'safetensors' or 'sharded', got {weight_format!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    dims = SIZES[size]
    root = Path(out_dir)
    paths = FixturePaths(root, root / "base", root / "checkpoint", root / "prompts", root / "checkpoint" / "editreward.yaml")
    for folder in (paths.base, paths.checkpoint):
        folder.mkdir(parents=True, exist_ok=True)

    token_ids = write_tokenizer(paths.base, dims.bpe_vocab)
    n_tokens = len(token_ids["vocab"])
    _write_json(paths.base / "config.json", base_config(dims, token_ids, n_tokens))
    _write_json(paths.base / "preprocessor_config.json", preprocessor_config())

    # The checkpoint embedding was resized to len(tokenizer) after adding <|Reward|>.
    tensors = state_dict(dims, vocab_rows=n_tokens + 1, seed=seed)
    write_weights(paths.checkpoint, _cast(tensors, dtype), weight_format)
    paths.yaml.write_text(editreward_yaml(), encoding="utf-8")
    write_prompt_files(paths.prompts)
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


def write_tokenizer(base: Path, bpe_vocab: int) -> dict:
    """Write tokenizer.json, tokenizer_config.json and chat_template.json; return token ids."""
    from tokenizers import AddedToken

    tok = _train_bpe(bpe_vocab)
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


def _normal(rng: np.random.Generator, shape: Sequence[int], std: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


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


def state_dict(dims: FixtureSize, vocab_rows: int, seed: int) -> dict[str, np.ndarray]:
    """Full float32 reward-model state dict, drawn in a fixed order from one seeded generator."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for gen in (_vision_tensors(rng, dims), _text_tensors(rng, dims, vocab_rows), _head_tensors(rng, dims)):
        tensors.update(gen)
    return tensors


def _cast(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Cast everything but the reward heads (always float32, as upstream keeps them)."""
    if dtype == "float32":
        return tensors
    import ml_dtypes  # safetensors.numpy writes ml_dtypes.bfloat16 arrays as BF16

    return {k: v if k.startswith("rm_heads.") else v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}


def _shards(tensors: dict[str, np.ndarray], n_shards: int) -> list[dict[str, np.ndarray]]:
    """Split in key order into ``n_shards`` groups of roughly equal byte size."""
    budget = sum(v.nbytes for v in tensors.values()) / n_shards
    groups: list[dict[str, np.ndarray]] = [{}]
    filled = 0
    for name, arr in tensors.items():
        if groups[-1] and filled + arr.nbytes > budget and len(groups) < n_shards:
            groups.append({})
            filled = 0
        groups[-1][name] = arr
        filled += arr.nbytes
    return groups


def write_weights(folder: Path, tensors: dict[str, np.ndarray], weight_format: str, n_shards: int = 3) -> None:
    from safetensors.numpy import save_file

    meta = {"format": "pt"}  # transformers expects this metadata on safetensors it loads
    if weight_format == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        return
    groups = _shards(tensors, n_shards)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index)


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


def write_prompt_files(prompts_root: Path) -> None:
    folder = prompts_root / "EditReward" / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.py").write_text(_PROMPTS_PY, encoding="utf-8")
    (folder / "data_collator_qwen_edit.py").write_text(_COLLATOR_PY, encoding="utf-8")


# ---------------------------------------------------------------- helpers


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
