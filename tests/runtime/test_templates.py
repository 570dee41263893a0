"""Rubric templates are parsed out of the upstream files, never imported, and verified by hash."""

from __future__ import annotations

import hashlib
import io

import pytest
from editreward_rt import templates as tmod
from editreward_rt.errors import TemplateError
from editreward_rt.templates import (
    COLLATOR_FILE,
    PROMPTS_FILE,
    download_upstream,
    string_constants,
    templates_from_folder,
    templates_from_sources,
)


def test_extracts_the_two_rubrics_and_suffix(tiny):
    templates = templates_from_folder(tiny.prompts)
    assert [name for name, _ in templates.rubrics] == ["instruction_following", "visual_quality"]
    assert templates.reward_suffix.count("<|Reward|>") == 1
    text = templates.rubric_text(0, "make it {blue}")
    assert "make it {blue}" in text and text.endswith(templates.reward_suffix)


def test_accepts_the_folder_holding_the_files_directly(tiny):
    direct = templates_from_folder(tiny.prompts / "EditReward" / "dataset")
    assert direct.rubrics == templates_from_folder(tiny.prompts).rubrics


def test_files_are_parsed_not_executed(tmp_path):
    marker = tmp_path / "executed"
    prompts = (f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(3)\n"
               'INSTRUCTION_EDIT_FOLLOWING = """A {text_prompt}"""\nINSTRUCTION_EDIT_QUALITY = "B {text_prompt}"\n')
    collator = "import torch\nprompt_with_special_token = '\\nscore: <|Reward|>\\n'\nclass C:\n    x = 1\n"
    templates = templates_from_sources({PROMPTS_FILE: prompts, COLLATOR_FILE: collator}, "test")
    assert templates.rubric_text(1, "q") == "B q\nscore: <|Reward|>\n"
    assert not marker.exists()


def test_missing_constant_and_bad_python():
    with pytest.raises(TemplateError, match="INSTRUCTION_EDIT_QUALITY"):
        templates_from_sources({PROMPTS_FILE: "INSTRUCTION_EDIT_FOLLOWING = '{text_prompt}'",
                                COLLATOR_FILE: "prompt_with_special_token = '<|Reward|>'"}, "t")
    with pytest.raises(TemplateError, match="not valid Python"):
        string_constants("def (:", "x.py")


def test_suffix_must_hold_one_reward_token():
    with pytest.raises(TemplateError, match="exactly one"):
        templates_from_sources({PROMPTS_FILE: "INSTRUCTION_EDIT_FOLLOWING = '{text_prompt}'\nINSTRUCTION_EDIT_QUALITY = '{text_prompt}'",
                                COLLATOR_FILE: "prompt_with_special_token = 'no token'"}, "t")


def _fake_urlopen(payloads):
    def urlopen(url, timeout):
        for path, data in payloads.items():
            if url.endswith(path):
                return io.BytesIO(data)
        raise OSError("unreachable")
    return urlopen


def test_download_checks_sha256_at_the_pinned_commit(tiny, tmp_path, monkeypatch):
    payloads = {p: (tiny.prompts / p).read_bytes() for p in (PROMPTS_FILE, COLLATOR_FILE)}
    seen = []
    monkeypatch.setattr(tmod.urllib.request, "urlopen", lambda url, timeout: seen.append(url) or _fake_urlopen(payloads)(url, timeout))
    with pytest.raises(TemplateError, match="sha256"):
        download_upstream(cache_dir=tmp_path)
    assert tmod.UPSTREAM_COMMIT in seen[0]
    # With digests that match, the same bytes are accepted and cached.
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in payloads.items()}
    monkeypatch.setattr(tmod, "UPSTREAM_SHA256", digests)
    templates = download_upstream(cache_dir=tmp_path)
    assert templates.source.startswith("github:TIGER-AI-Lab/EditReward@")
    monkeypatch.setattr(tmod.urllib.request, "urlopen", _fake_urlopen({}))
    assert download_upstream(cache_dir=tmp_path).rubrics == templates.rubrics  # served from the verified cache


def test_offline_download_names_the_workaround(tmp_path, monkeypatch):
    monkeypatch.setattr(tmod.urllib.request, "urlopen", _fake_urlopen({}))
    with pytest.raises(TemplateError, match="--prompts-from"):
        download_upstream(cache_dir=tmp_path)


def test_project_ships_no_upstream_rubric_text():
    from conftest import ROOT as root

    needle = " & ".join(["Instruction Following", "Semantic Fidelity"])  # a phrase of the real rubric
    folders = [root / d for d in ("runtime", "export", "quantize", "benchmarks", "tests", "docs")]
    files = [p for d in folders if d.is_dir() for p in d.rglob("*") if p.suffix in (".py", ".md", ".json", ".txt")]
    assert files
    for path in files + [p for p in [root / "README.md"] if p.is_file()]:
        assert needle not in path.read_text(encoding="utf-8", errors="ignore"), path
