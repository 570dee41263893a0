"""Random-weight fixtures: layout, determinism, and loadability by transformers."""

from __future__ import annotations

import ast
import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from editreward_families.qwen2_5_vl.fixture import SIZES, SPECIAL_TOKENS, write_fixture
from editreward_rt.cli import main as cli_main

TINY = SIZES["tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _header(path: Path) -> dict:
    """safetensors header: u64 little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _load_np(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _n_tokens(base: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def expected_shapes(d, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    vh, vi, H, I, hd = d.vision_hidden, d.vision_intermediate, d.hidden, d.intermediate, d.head_dim
    shapes = {"model.visual.patch_embed.proj.weight": (vh, 3, 2, 14, 14)}
    for i in range(d.vision_depth):
        p = f"model.visual.blocks.{i}"
        shapes.update({
            f"{p}.norm1.weight": (vh,), f"{p}.norm2.weight": (vh,),
            f"{p}.attn.qkv.weight": (3 * vh, vh), f"{p}.attn.qkv.bias": (3 * vh,),
            f"{p}.attn.proj.weight": (vh, vh), f"{p}.attn.proj.bias": (vh,),
            f"{p}.mlp.gate_proj.weight": (vi, vh), f"{p}.mlp.gate_proj.bias": (vi,),
            f"{p}.mlp.up_proj.weight": (vi, vh), f"{p}.mlp.up_proj.bias": (vi,),
            f"{p}.mlp.down_proj.weight": (vh, vi), f"{p}.mlp.down_proj.bias": (vh,),
        })
    shapes.update({
        "model.visual.merger.ln_q.weight": (vh,),
        "model.visual.merger.mlp.0.weight": (4 * vh, 4 * vh), "model.visual.merger.mlp.0.bias": (4 * vh,),
        "model.visual.merger.mlp.2.weight": (H, 4 * vh), "model.visual.merger.mlp.2.bias": (H,),
        "model.language_model.embed_tokens.weight": (vocab_rows, H),
        "model.language_model.norm.weight": (H,),
        "lm_head.weight": (vocab_rows, H),
    })
    for i in range(d.layers):
        p = f"model.language_model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (d.heads * hd, H), f"{p}.self_attn.q_proj.bias": (d.heads * hd,),
            f"{p}.self_attn.k_proj.weight": (d.kv_heads * hd, H), f"{p}.self_attn.k_proj.bias": (d.kv_heads * hd,),
            f"{p}.self_attn.v_proj.weight": (d.kv_heads * hd, H), f"{p}.self_attn.v_proj.bias": (d.kv_heads * hd,),
            f"{p}.self_attn.o_proj.weight": (H, d.heads * hd),
            f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H), f"{p}.mlp.down_proj.weight": (H, I),
            f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
        })
    for k in range(2):
        p = f"rm_heads.head_{k}"
        shapes.update({
            f"{p}.0.weight": (1024, H), f"{p}.0.bias": (1024,),
            f"{p}.3.weight": (16, 1024), f"{p}.3.bias": (16,),
            f"{p}.5.weight": (2, 16), f"{p}.5.bias": (2,),
        })
    return shapes


def test_same_seed_same_bytes_and_other_seed_other_weights(tiny, tmp_path):
    again = write_fixture(tmp_path / "again", "tiny", seed=0)
    assert _files(again.root) == _files(tiny.root)
    other = write_fixture(tmp_path / "other", "tiny", seed=1)
    assert (other.base / "tokenizer.json").read_bytes() == (tiny.base / "tokenizer.json").read_bytes()
    a, b = _load_np(tiny.checkpoint / "model.safetensors"), _load_np(other.checkpoint / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(not np.array_equal(a[k], b[k]) for k in a)


def test_keys_shapes_and_size(tiny):
    tensors = _load_np(tiny.checkpoint / "model.safetensors")
    vocab_rows = _n_tokens(tiny.base) + 1  # embedding resized after adding <|Reward|>
    assert {k: v.shape for k, v in tensors.items()} == expected_shapes(TINY, vocab_rows)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in tensors.values())
    assert (tiny.checkpoint / "model.safetensors").stat().st_size < 5_000_000


def test_tokenizer_special_tokens(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny.base / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    learned = tok.get_vocab_size(with_added_tokens=False)
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(learned, learned + len(SPECIAL_TOKENS)))
    assert "<|Reward|>" not in vocab
    assert tok.encode("Replace the red car.").ids[0] < learned  # no BOS prepended
    assert tok.decode(tok.encode("It's 42 cats!").ids) == "It's 42 cats!"
    tcfg = json.loads((tiny.base / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>" and tcfg["pad_token"] == "<|endoftext|>" and tcfg["bos_token"] is None
    assert {v["content"]: int(k) for k, v in tcfg["added_tokens_decoder"].items()} == {t: vocab[t] for t in SPECIAL_TOKENS}


def test_chat_template_renders_like_qwen2_vl(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.base)
    msgs = [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Rate this edit."},
    ]}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>Rate this edit.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    template_file = json.loads((tiny.base / "chat_template.json").read_text())
    assert template_file["chat_template"] == tok.chat_template
    assert len(tok) == _n_tokens(tiny.base)


def test_config_loads_in_transformers(tiny):
    from transformers import Qwen2_5_VLConfig

    raw = json.loads((tiny.base / "config.json").read_text())
    cfg = Qwen2_5_VLConfig.from_pretrained(tiny.base)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (TINY.hidden, TINY.layers, TINY.heads, TINY.kv_heads, TINY.intermediate)
    assert text.vocab_size == raw["vocab_size"] and raw["vocab_size"] % 64 == 0 and raw["vocab_size"] >= _n_tokens(tiny.base)
    assert list(text.rope_parameters["mrope_section"]) == list(TINY.mrope_section)
    assert sum(TINY.mrope_section) == TINY.head_dim // 2
    assert text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.out_hidden_size) == (
        TINY.vision_depth, TINY.vision_hidden, TINY.vision_heads, TINY.vision_intermediate, TINY.hidden)
    assert list(vision.fullatt_block_indexes) == list(TINY.fullatt)
    vocab = json.loads((tiny.base / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert cfg.image_token_id == ids["<|image_pad|>"] and cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"] and cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert raw["bos_token_id"] == ids["<|endoftext|>"] and raw["eos_token_id"] == ids["<|im_end|>"]


def _head(tensors, k: int, x):
    """ranknet head: Linear -> ReLU -> (Dropout) -> Linear -> ReLU -> Linear, at indices 0, 3, 5."""
    import torch.nn.functional as F

    p = f"rm_heads.head_{k}"
    x = F.relu(F.linear(x, tensors[f"{p}.0.weight"], tensors[f"{p}.0.bias"]))
    x = F.relu(F.linear(x, tensors[f"{p}.3.weight"], tensors[f"{p}.3.bias"]))
    return F.linear(x, tensors[f"{p}.5.weight"], tensors[f"{p}.5.bias"])


def test_strict_load_into_transformers_and_outputs_vary(tiny):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tensors = load_file(str(tiny.checkpoint / "model.safetensors"))
    cfg = Qwen2_5_VLConfig.from_pretrained(tiny.base)
    cfg.text_config.vocab_size = tensors["lm_head.weight"].shape[0]
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("rm_heads.")}, strict=True)

    tok = AutoTokenizer.from_pretrained(tiny.base)
    texts = ["Replace the red car.", "Add a small dog near the tree.", "Make the sky dark.",
             "Remove the hat", "Paint the old house blue!", "Turn 3 chairs into boats."]
    with torch.no_grad():
        pooled = torch.stack([
            model.model(input_ids=torch.tensor([tok(t)["input_ids"]])).last_hidden_state[0].mean(0) for t in texts
        ])
        outs = torch.stack([_head(tensors, k, pooled) for k in range(2)])  # [head, input, (mu, log_sigma)]
    assert torch.isfinite(outs).all()
    assert (outs.std(dim=1) > 1e-2).all(), outs.std(dim=1)
    assert outs.abs().max() < 100

    # One 56x56 image: grid (1, 4, 4) patches -> 4 merged <|image_pad|> tokens.
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = tok("Look: <|vision_start|>")["input_ids"] + [image_pad] * 4 + tok("<|vision_end|> ok")["input_ids"]
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids]), pixel_values=pixels,
                             image_grid_thw=torch.tensor([[1, 4, 4]])).last_hidden_state
    assert torch.isfinite(hidden).all() and 0.1 < hidden.std() < 10


def test_sharded_round_trip(tiny, tmp_path):
    sharded = write_fixture(tmp_path, "tiny", seed=0, weight_format="sharded")
    index = json.loads((sharded.checkpoint / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1 and shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    assert not (sharded.checkpoint / "model.safetensors").exists()
    merged = {}
    for name in shard_names:
        part = _load_np(sharded.checkpoint / name)
        assert all(index["weight_map"][k] == name for k in part)
        merged.update(part)
    single = _load_np(tiny.checkpoint / "model.safetensors")
    assert merged.keys() == single.keys() == index["weight_map"].keys()
    assert all(np.array_equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in single.values())


def test_bf16_keeps_heads_float32(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    bf16 = write_fixture(tmp_path, "tiny", seed=0, dtype="bfloat16")
    header = _header(bf16.checkpoint / "model.safetensors")
    assert {k for k, v in header.items() if v["dtype"] == "F32"} == {k for k in header if k.startswith("rm_heads.")}
    assert {v["dtype"] for k, v in header.items() if not k.startswith("rm_heads.")} == {"BF16"}
    low, full = load_file(str(bf16.checkpoint / "model.safetensors")), load_file(str(tiny.checkpoint / "model.safetensors"))
    assert all(torch.equal(low[k], full[k].to(low[k].dtype)) for k in full)


def test_prompt_files_and_yaml(tiny):
    folder = tiny.prompts / "EditReward" / "dataset"
    constants = {}
    for name in ("prompts.py", "data_collator_qwen_edit.py"):
        tree = ast.parse((folder / name).read_text())
        constants.update({
            node.targets[0].id: node.value.value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        })
    rubrics = [constants[n] for n in ("INSTRUCTION_EDIT_FOLLOWING", "INSTRUCTION_EDIT_QUALITY",
                                      "INSTRUCTION_EDIT_OVERALL", "INSTRUCTION_EDIT_OVERALL_DETAILED")]
    assert all(r.startswith("\n") and r.endswith("Text instruction - {text_prompt}\n") for r in rubrics)
    follow, quality = rubrics[0].splitlines(), rubrics[1].splitlines()
    assert follow[:3] == quality[:3] and follow != quality  # shared opening, then they differ
    assert constants["prompt_with_special_token"] == "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    assert constants["prompt_without_special_token"] == "\nPlease provide the overall ratings of this image: \n"

    cfg = yaml.safe_load(tiny.yaml.read_text())
    assert (tiny.yaml.parent / cfg["model_name_or_path"]).resolve() == tiny.base.resolve()
    assert cfg["rm_head_type"] == "ranknet_multi_head" and cfg["pooling_strategy"] == "mean"
    assert cfg["min_pixels"] == cfg["max_pixels"] == 200704 and cfg["output_dim"] == 2
    assert cfg["use_special_tokens"] is True and cfg["reward_token"] == "special"


def test_cli_prints_paths(tmp_path, capsys):
    assert cli_main(["make-fixture", "--out", str(tmp_path), "--size", "tiny", "--seed", "3", "--format", "sharded"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"root", "base", "checkpoint", "prompts", "yaml"}
    assert (Path(printed["checkpoint"]) / "model.safetensors.index.json").is_file()
    assert Path(printed["yaml"]).is_file()


def test_full_size_layout_scaled_down(tmp_path, monkeypatch):
    """What ``--size full`` adds, at tiny widths: filler tokens take the tokenizer and embedding to
    the asked rows without changing how text tokenizes, rubrics reach the asked length, and the
    weights stream into shards (header reserved, then filled) that safetensors and the checkpoint
    reader load as they load the held path's."""
    from editreward_families.qwen2_5_vl import fixture
    from editreward_rt.checkpoint import open_checkpoint
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    monkeypatch.setitem(fixture.SIZES, "tiny-full", dataclasses.replace(SIZES["tiny"], vocab_rows=1500, rubric_tokens=200))
    monkeypatch.setattr(fixture, "SHARD_BYTES", 1 << 18)
    paths = write_fixture(tmp_path / "f", size="tiny-full", weight_format="sharded", dtype="bfloat16")
    held = write_fixture(tmp_path / "h", size="tiny", weight_format="sharded", dtype="bfloat16")
    padded, plain = (Tokenizer.from_file(str(p.base / "tokenizer.json")) for p in (paths, held))
    assert padded.get_vocab_size() == 1499
    text = "Make the red car blue. Text instruction - keep the sky!"
    assert padded.encode(text).tokens == plain.encode(text).tokens
    ckpt = open_checkpoint(str(paths.checkpoint), prompts_from=str(paths.prompts))
    assert ckpt.spec.text.vocab_size == 1500
    shards = sorted(paths.checkpoint.glob("model-*.safetensors"))
    assert len(shards) > 3 and not list(paths.checkpoint.glob(".shard-*"))
    tensors = {k: v for s in shards for k, v in load_file(str(s)).items()}
    index = json.loads((paths.checkpoint / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    reference = {k: v for s in sorted(held.checkpoint.glob("model-*.safetensors")) for k, v in load_file(str(s)).items()}
    vision = [k for k in reference if k.startswith("model.visual.")]  # drawn before the (longer) embedding
    assert vision and all(np.array_equal(tensors[k], reference[k]) for k in vision)
    assert {k: v.shape for k, v in tensors.items() if "embed" not in k and "lm_head" not in k} == \
        {k: v.shape for k, v in reference.items() if "embed" not in k and "lm_head" not in k}
    rubrics = [text for _, text in ckpt.templates.rubrics]
    assert len(rubrics) == 2 and all(len(padded.encode(t).ids) >= 200 for t in rubrics)
