"""Rubric templates: model data read from the upstream repository, never shipped with this project.

The upstream code keeps its two rubric prompts and the reward suffix as module-level
string constants in two Python files. We read them by parsing the files with ``ast``
and taking the literal values; the files are never imported or executed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import TemplateError

UPSTREAM_REPO = "TIGER-AI-Lab/EditReward"
UPSTREAM_COMMIT = "edb027edde6080b8a9521ef8e87049b3797f8374"
PROMPTS_FILE = "EditReward/dataset/prompts.py"
COLLATOR_FILE = "EditReward/dataset/data_collator_qwen_edit.py"
UPSTREAM_SHA256 = {
    PROMPTS_FILE: "1a64bd01924d69fe1bb4b1664d33a32c06c5fbc7230ed7cb67f253183322c7aa",
    COLLATOR_FILE: "afe43a33ae6481db03a8ab3b50c4b5e9923c2c6ce89e1022fe533755ba42b2c7",
}
TEMPLATES_FILE = "editreward_templates.json"

# Head i of the reference reads rubric i: head_0 instruction following, head_1 visual quality.
HEAD_RUBRICS = (
    ("instruction_following", PROMPTS_FILE, "INSTRUCTION_EDIT_FOLLOWING"),
    ("visual_quality", PROMPTS_FILE, "INSTRUCTION_EDIT_QUALITY"),
)
SUFFIX_CONSTANT = (COLLATOR_FILE, "prompt_with_special_token")


@dataclass(frozen=True)
class Templates:
    """The text pieces the reference formats into each rubric pass."""

    rubrics: tuple[tuple[str, str], ...]  # ((head name, template with {text_prompt}), ...)
    reward_suffix: str
    source: str  # where they came from, for the manifest

    def rubric_text(self, head: int, instruction: str) -> str:
        return self.rubrics[head][1].format(text_prompt=instruction) + self.reward_suffix

    def to_dict(self) -> dict:
        return {"rubrics": [list(r) for r in self.rubrics], "reward_suffix": self.reward_suffix, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> "Templates":
        try:
            return cls(tuple((str(n), str(t)) for n, t in data["rubrics"]), str(data["reward_suffix"]), str(data["source"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateError(f"malformed template data: {exc}") from exc


def string_constants(source: str, filename: str) -> dict[str, str]:
    """Module-level ``NAME = "literal"`` assignments of a Python file, without executing it."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise TemplateError(f"{filename} is not valid Python: {exc}") from exc
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


def _pick(constants: dict[str, dict[str, str]], file: str, name: str) -> str:
    value = constants[file].get(name)
    if value is None:
        raise TemplateError(f"{file} defines no string constant {name}")
    return value


def templates_from_sources(sources: dict[str, str], origin: str) -> Templates:
    """Build templates from the text of the two upstream files, keyed by their repo paths."""
    constants = {file: string_constants(text, file) for file, text in sources.items()}
    rubrics = tuple((head, _pick(constants, file, name)) for head, file, name in HEAD_RUBRICS)
    for head, text in rubrics:
        if "{text_prompt}" not in text:
            raise TemplateError(f"rubric {head} has no {{text_prompt}} placeholder")
    suffix = _pick(constants, *SUFFIX_CONSTANT)
    if suffix.count("<|Reward|>") != 1:
        raise TemplateError("the reward suffix must hold exactly one <|Reward|> token")
    return Templates(rubrics, suffix, origin)


def _locate(folder: Path, repo_path: str) -> Path:
    """Accept a clone of the repository, or the folder that directly holds the two files."""
    for candidate in (folder / repo_path, folder / Path(repo_path).name):
        if candidate.is_file():
            return candidate
    raise TemplateError(f"{repo_path} not found under {folder} (give a clone of {UPSTREAM_REPO} or the folder holding the file)")


def templates_from_folder(folder: str | os.PathLike) -> Templates:
    folder = Path(folder)
    if not folder.is_dir():
        raise TemplateError(f"--prompts-from {folder} is not a folder")
    sources = {}
    for repo_path in UPSTREAM_SHA256:
        sources[repo_path] = _locate(folder, repo_path).read_text(encoding="utf-8")
    return templates_from_sources(sources, origin=f"local:{folder.resolve()}")


def download_upstream(cache_dir: str | os.PathLike | None = None, timeout: float = 30.0) -> Templates:
    """Fetch the two files at the pinned commit, check their sha256, and extract the templates."""
    cache = Path(cache_dir or Path.home() / ".cache" / "editreward_rt" / UPSTREAM_COMMIT)
    sources = {}
    for repo_path, digest in UPSTREAM_SHA256.items():
        cached = cache / repo_path
        if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == digest:
            data = cached.read_bytes()
        else:
            url = f"https://raw.githubusercontent.com/{UPSTREAM_REPO}/{UPSTREAM_COMMIT}/{repo_path}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    data = response.read()
            except OSError as exc:
                raise TemplateError(
                    f"could not download {url} ({exc}); pass --prompts-from with a local clone of {UPSTREAM_REPO}"
                ) from exc
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise TemplateError(f"{url} has sha256 {actual}, expected {digest}; refusing to use it")
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(data)
        sources[repo_path] = data.decode("utf-8")
    return templates_from_sources(sources, origin=f"github:{UPSTREAM_REPO}@{UPSTREAM_COMMIT}")


def resolve_templates(prompts_from: str | os.PathLike | None, checkpoint_dir: Path | None) -> Templates:
    """Explicit folder first, then templates stored in the checkpoint folder, then the pinned download."""
    if prompts_from is not None:
        return templates_from_folder(prompts_from)
    if checkpoint_dir is not None and (checkpoint_dir / TEMPLATES_FILE).is_file():
        return load_templates_file(checkpoint_dir / TEMPLATES_FILE)
    return download_upstream()


def load_templates_file(path: Path) -> Templates:
    try:
        return Templates.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise TemplateError(f"cannot read {path}: {exc}") from exc


def save_templates_file(templates: Templates, path: Path) -> None:
    path.write_text(json.dumps(templates.to_dict(), indent=1), encoding="utf-8")
