"""Checkpoint resolution: upstream and self-contained layouts, aliases, and every failure mode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from editreward_families.qwen2_5_vl.fixture import write_fixture
from editreward_families.qwen2_5_vl.weights import normalise_key
from editreward_rt import Scorer
from editreward_rt.checkpoint import ALIASES, KNOWN, open_checkpoint
from editreward_rt.errors import ArchitectureError, CheckpointError, TemplateError, WeightMismatchError
from editreward_rt.templates import save_templates_file, templates_from_folder
from safetensors.torch import load_file, save_file


def copy_fixture(tiny, tmp_path):
    root = tmp_path / "fx"
    shutil.copytree(tiny.root, root)
    return root


def score_with(path, images, **kwargs):
    scorer = Scorer.load(path, backend="torch", mode="fast", **kwargs)
    return scorer.score("Add a green bowl", images[0], images[1])


@pytest.fixture(scope="module")
def expected(fast, images):
    return fast.score("Add a green bowl", images[0], images[1])


def test_alias_names_a_published_checkpoint():
    assert ALIASES["TIGER-Lab/EditReward"] in KNOWN
    assert KNOWN[ALIASES["TIGER-Lab/EditReward"]]["model_name_or_path"] == "XiaomiMiMo/MiMo-VL-7B-SFT-2508"


def test_sharded_bf16_checkpoint_loads(tmp_path, images):
    paths = write_fixture(tmp_path, size="tiny", seed=0, weight_format="sharded", dtype="bfloat16")
    ckpt = open_checkpoint(paths.checkpoint, prompts_from=paths.prompts)
    assert len(ckpt.files) == 3
    state = ckpt.state_dict()
    assert state["rm_heads.head_0.0.weight"].dtype == torch.float32
    assert state["model.language_model.embed_tokens.weight"].dtype == torch.bfloat16
    assert np.isfinite(score_with(paths.checkpoint, images, prompts_from=paths.prompts).mu)


def test_model_pth_with_old_key_names(tiny, tmp_path, images, expected):
    root = copy_fixture(tiny, tmp_path)
    state = load_file(str(root / "checkpoint" / "model.safetensors"))
    old = {}
    for key, value in state.items():  # transformers < 4.52 names
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        old[key] = value
    assert {normalise_key(k) for k in old} == set(state)
    (root / "checkpoint" / "model.safetensors").unlink()
    torch.save({"model": old}, root / "checkpoint" / "model.pth")
    score = score_with(root / "checkpoint", images, prompts_from=root / "prompts")
    assert score.mu == pytest.approx(expected.mu, abs=1e-6)


def test_pickled_code_is_refused(tiny, tmp_path):
    root = copy_fixture(tiny, tmp_path)
    (root / "checkpoint" / "model.safetensors").unlink()

    marker = tmp_path / "payload-ran"

    class Exploit:
        def __reduce__(self):  # unpickling this creates the marker file
            return (open, (str(marker), "w"))

    torch.save({"model": Exploit()}, root / "checkpoint" / "model.pth")
    with pytest.raises(CheckpointError, match="never runs code") as info:
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")
    assert not marker.exists()  # the payload did not run
    assert "Weights only load failed" not in str(info.value) and len(str(info.value)) < 400

    with open(root / "checkpoint" / "model.pth", "rb") as f:  # the check can see a payload that runs
        try:
            torch.load(f, weights_only=False)
        except Exception:
            pass
    assert marker.exists()


def test_self_contained_folder(tiny, tmp_path, images, expected):
    folder = tmp_path / "all-in-one"
    shutil.copytree(tiny.base, folder)
    shutil.copy(tiny.checkpoint / "model.safetensors", folder)
    save_templates_file(templates_from_folder(tiny.prompts), folder / "editreward_templates.json")
    score = score_with(folder, images)  # templates come from the folder, base from the folder
    assert score.mu == pytest.approx(expected.mu, abs=1e-6)


def test_explicit_base_overrides_yaml(tiny, tmp_path, images, expected):
    root = copy_fixture(tiny, tmp_path)
    (root / "checkpoint" / "editreward.yaml").unlink()
    with pytest.raises(CheckpointError, match="--base"):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")
    score = score_with(root / "checkpoint", images, base=str(root / "base"), prompts_from=root / "prompts")
    assert score.mu == pytest.approx(expected.mu, abs=1e-6)


def test_missing_weights(tiny, tmp_path):
    root = copy_fixture(tiny, tmp_path)
    (root / "checkpoint" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")


def test_missing_shard(tmp_path):
    paths = write_fixture(tmp_path, size="tiny", weight_format="sharded")
    next(paths.checkpoint.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shards"):
        open_checkpoint(paths.checkpoint, prompts_from=paths.prompts)


def test_corrupt_safetensors(tiny, tmp_path):
    root = copy_fixture(tiny, tmp_path)
    (root / "checkpoint" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")


def test_missing_and_misshapen_tensors(tiny, tmp_path):
    root = copy_fixture(tiny, tmp_path)
    path = root / "checkpoint" / "model.safetensors"
    state = load_file(str(path))
    del state["model.language_model.layers.1.mlp.up_proj.weight"]
    state["model.visual.merger.ln_q.weight"] = torch.zeros(7)
    save_file(state, str(path))
    with pytest.raises(WeightMismatchError) as info:
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")
    assert "layers.1.mlp.up_proj.weight" in str(info.value) and "ln_q" in str(info.value)


def test_unknown_architecture(tiny, tmp_path):
    root = copy_fixture(tiny, tmp_path)
    config = json.loads((root / "base" / "config.json").read_text())
    config["model_type"] = "llava"
    (root / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureError, match="llava"):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")


def test_unknown_head_type(tiny, tmp_path):
    root = copy_fixture(tiny, tmp_path)
    yaml_path = root / "checkpoint" / "editreward.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("ranknet_multi_head", "default"))
    with pytest.raises(ArchitectureError, match="rm_head_type"):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")


def test_tokenizer_that_does_not_fit_the_embedding(tiny, tmp_path):
    other = write_fixture(tmp_path / "small-base", size="small")
    with pytest.raises(CheckpointError, match="embedding has"):
        open_checkpoint(tiny.checkpoint, base=str(other.base), prompts_from=tiny.prompts)


def test_not_a_folder_nor_a_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither a folder nor a hub"):
        open_checkpoint(tmp_path / "does-not-exist")


def test_hub_unreachable_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot fetch"):
        open_checkpoint("TIGER-Lab/EditReward")


def test_missing_prompt_files(tiny, tmp_path):
    with pytest.raises(TemplateError, match="prompts.py"):
        open_checkpoint(tiny.checkpoint, prompts_from=tmp_path)


def test_spec_is_read_from_checkpoint(tiny):
    ckpt = open_checkpoint(tiny.checkpoint, prompts_from=tiny.prompts)
    rows = load_file(str(tiny.checkpoint / "model.safetensors"))["model.language_model.embed_tokens.weight"].shape[0]
    config = json.loads((tiny.base / "config.json").read_text())
    assert ckpt.spec.text.vocab_size == rows != config["vocab_size"]
    assert ckpt.spec.tokens.reward == rows - 1
    assert ckpt.spec.heads.layer_sizes == (ckpt.spec.text.hidden_size, 1024, 16, 2)
    assert ckpt.spec.heads.fusion == "mean"


def _edit_config(root, **changes):
    path = root / "base" / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        nested = key.startswith("vision_") and key != "vision_config"
        target, name = (config["vision_config"], key[len("vision_"):]) if nested else (config, key)
        if value is None:
            target.pop(name)
        else:
            target[name] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,error,message", [
    ({"num_hidden_layers": 10**6}, WeightMismatchError, "num_hidden_layers is 1000000 but the checkpoint holds 2"),
    ({"num_hidden_layers": 10**9}, WeightMismatchError, "num_hidden_layers"),
    ({"vision_depth": 10**7}, WeightMismatchError, "vision_config.depth is 10000000"),
    ({"vision_config": None}, ArchitectureError, "no vision_config"),
    ({"hidden_size": "wide"}, ArchitectureError, "malformed size"),
    ({"num_attention_heads": 0}, ArchitectureError, "malformed size|not one of a real model"),
    ({"vision_num_heads": 0}, ArchitectureError, "malformed size|not one of a real model"),
    ({"intermediate_size": -4}, ArchitectureError, "not one of a real model"),
])
def test_hostile_configs_cost_no_time(tiny, tmp_path, changes, error, message):
    import time

    root = copy_fixture(tiny, tmp_path)
    _edit_config(root, **changes)
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("file,text,message", [
    ("base/config.json", "[" * 100_000 + "]" * 100_000, "not valid JSON .RecursionError"),
    ("base/config.json", '{"a": ' * 100_000 + "1" + "}" * 100_000, "not valid JSON .RecursionError"),
    ("base/config.json", '["model_type", "qwen2_5_vl"]', "holds a JSON list, not an object"),
    ("checkpoint/editreward.yaml", "- model_name_or_path\n- base\n", "holds a YAML list"),
    ("checkpoint/editreward.yaml", "[" * 100_000 + "]" * 100_000, "cannot parse"),
])
def test_deep_or_non_object_model_files_are_checkpoint_errors(tiny, tmp_path, file, text, message):
    """A model file nested past the parser's recursion limit, or holding a list, is a CheckpointError
    naming the file, not a RecursionError or AttributeError."""
    root = copy_fixture(tiny, tmp_path)
    (root / file).write_text(text)
    with pytest.raises(CheckpointError, match=message) as caught:
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")
    assert file.split("/")[1] in str(caught.value)


@pytest.mark.parametrize("index", ["[1, 2]", '{"weight_map": ["model-00001.safetensors"]}', '{"weight_map": {"a": 3}}'])
def test_a_malformed_shard_index_is_a_checkpoint_error(tmp_path, index):
    paths = write_fixture(tmp_path, size="tiny", weight_format="sharded")
    (paths.checkpoint / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        open_checkpoint(paths.checkpoint, prompts_from=paths.prompts)


def test_absurd_safetensors_header_length(tiny, tmp_path):
    import struct

    root = copy_fixture(tiny, tmp_path)
    weights = root / "checkpoint" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**9 }}",
])
def test_a_chat_template_runs_with_bounded_work(tiny, tmp_path, template):
    import time

    root = copy_fixture(tiny, tmp_path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (root / "base" / name).unlink(missing_ok=True)
    config = json.loads((root / "base" / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (root / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="chat template"):
        open_checkpoint(root / "checkpoint", prompts_from=root / "prompts")
    assert time.perf_counter() - start < 5.0
