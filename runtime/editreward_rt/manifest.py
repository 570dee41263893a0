"""The exported model folder: a versioned ``manifest.json`` beside the graphs and tokenizer.

The manifest carries everything the runtime needs (architecture, preprocessing constants,
special token ids, rendered chat text, rubric templates, graph I/O, precision, file hashes,
tool versions). Nothing is inferred from file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .backends import BACKENDS, DEFAULT_EXPORTED
from .errors import ArchitectureError, ManifestError, TemplateError
from .families import FAMILIES, family_for, family_of_manifest
from .manifest_schema import check_fields, check_graph_io, check_header
from .prompts import load_tokenizer
from .templates import Templates

MANIFEST = "manifest.json"
FORMAT = "editreward-exported-model"
MANIFEST_VERSION = 1
KNOWN_VERSIONS = (1,)
# The backends that read a model folder: what the manifest's "runtime" may name.
EXPORTED_RUNTIMES = tuple(name for name, entry in BACKENDS.items() if "exported" in entry.reads)
IR_GRAPH, IR_WEIGHTS = ".xml", ".bin"  # an OpenVINO IR graph and the weights file it implies
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB cap, with margin: larger graphs keep their weights in <graph>.onnx.data


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ExportedModel:
    """An exported model folder, read and verified."""

    root: Path
    manifest: dict
    spec: object  # the family's ModelSpec
    tokenizer: object
    chat_text: str
    templates: Templates

    def graph_path(self, name: str) -> Path:
        try:
            return self.root / self.manifest["graphs"][name]["file"]
        except KeyError as exc:
            raise ManifestError(f"{self.root / MANIFEST} declares no graph {name!r}") from exc


def read_manifest(root: Path) -> dict:
    """The manifest's JSON and the header fields read before the folder is opened (version,
    family, runtime); the rest is checked by ``open_exported``."""
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} is not an exported model folder: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{path}: arrays or objects nested too deeply to read") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an EditReward exported-model manifest")
    with named(path):
        check_header(manifest, KNOWN_VERSIONS, FAMILIES, EXPORTED_RUNTIMES)
    return manifest


@contextlib.contextmanager
def named(path: Path):
    """Schema errors (a field's JSON path and its problem) prefixed with the manifest's path; a
    family's refusal of the spec it reads becomes one too."""
    try:
        yield
    except (ManifestError, ArchitectureError) as exc:
        raise ManifestError(f"{path}: {exc}") from None


def referenced_files(manifest: dict) -> dict[str, str]:
    """Every file the manifest points the runtime at -> what points at it."""
    out = {}
    for section in ("graphs", "trt"):
        if not isinstance(manifest.get(section) or {}, dict):
            raise ManifestError(f"the manifest's {section!r} is not an object")
    engines = (manifest.get("trt") or {}).get("engines") or {}
    if not isinstance(engines, dict):
        raise ManifestError("the manifest's trt.engines is not an object")
    for name, graph in (manifest.get("graphs") or {}).items():
        file = graph.get("file") if isinstance(graph, dict) else graph
        out[file] = f"graph {name!r}"
        if isinstance(file, str) and file.endswith(IR_GRAPH):
            # An OpenVINO IR graph names no weights file: OpenVINO reads the .bin of the same stem.
            out[file[: -len(IR_GRAPH)] + IR_WEIGHTS] = f"graph {name!r}'s weights"
    for key in ("tokenizer", "weights"):
        if manifest.get(key) is not None:
            out[manifest[key]] = key
    for name, engine in engines.items():
        out[engine.get("file") if isinstance(engine, dict) else engine] = f"TensorRT engine {name!r}"
    return out


# Files a download or a repository adds beside a model folder's own: never read by the runtime.
INCIDENTAL = ("README.md", "LICENSE", "LICENSE.txt", "NOTICE")


def _incidental(name: str) -> bool:
    return name.startswith(".") or name in INCIDENTAL


def check_layout(root: Path, manifest: dict) -> None:
    """Every file the folder holds and every file the manifest points at is covered by the
    manifest's hashes: plain names inside the folder (no separators, no links), none unlisted.
    A graph's external data lives in such a file too (``<graph>.onnx.data``), and the graph that
    names it is hashed; an OpenVINO IR graph ``<graph>.xml`` names no weights file, so its
    ``<graph>.bin`` is referenced itself. Nothing the runtime reads escapes the hashes."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise ManifestError(f"{root / MANIFEST} lists no file hashes")
    for name in list(files) + list(referenced_files(manifest)):
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", "..", MANIFEST):
            raise ManifestError(f"{root / MANIFEST} names {name!r}, which is not a file inside the model folder")
        if (root / name).is_symlink():
            raise ManifestError(f"{root / name} is a symbolic link; a model folder holds its files itself")
    unhashed = {name: why for name, why in referenced_files(manifest).items() if name not in files}
    if unhashed:
        raise ManifestError(f"{root / MANIFEST}: {', '.join(f'{w} ({n})' for n, w in unhashed.items())} "
                            "not covered by the manifest's hashes")
    unlisted = sorted(p.name for p in root.iterdir()
                      if p.name != MANIFEST and p.name not in files and not _incidental(p.name))
    if unlisted:
        raise ManifestError(f"{root} holds files its manifest does not hash: {unlisted[:5]}; a model folder "
                            "holds only what its exporter wrote")


def verify_files(root: Path, manifest: dict) -> None:
    for name, expected in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(f"{path} fails its hash check (sha256 {actual[:12]}..., manifest says {expected[:12]}...): altered or corrupt")


def open_exported(root, verify: bool = True) -> ExportedModel:
    """Read a model folder: its manifest through the schema (every field, and the declared graph
    I/O against what the spec implies), then its files against their hashes, then its tokenizer."""
    root = Path(root)
    manifest = read_manifest(root)
    with named(root / MANIFEST):
        check_fields(manifest, needs_graphs=manifest.get("runtime", DEFAULT_EXPORTED) != "torch")
        spec = family_of_manifest(manifest).spec_from_dict(manifest["spec"])
        check_graph_io(manifest.get("graphs", {}), family_for(spec).graph_specs(manifest.get("kv_dtype", "float32")))
        try:
            templates = Templates.from_dict(manifest["templates"])
        except TemplateError as exc:
            raise ManifestError(f"templates: {exc}") from None
        check_quantization(manifest)
    if verify:
        check_layout(root, manifest)
        verify_files(root, manifest)
    tokenizer = load_tokenizer(root / manifest.get("tokenizer", "tokenizer.json"), expected_size=spec.text.vocab_size)
    return ExportedModel(root, manifest, spec, tokenizer, manifest["chat_text"], templates)


def check_quantization(manifest: dict) -> None:
    """A quantized folder's scheme must be one this build registers, at the version it writes
    (``editreward_rt.schemes``: configs only, no quantization library is imported)."""
    if manifest.get("quantization") is None:
        return
    from .schemes import QuantizeError, scheme_from_dict

    try:
        scheme_from_dict(manifest["quantization"])
    except (QuantizeError, TypeError, ValueError) as exc:  # a config value its dataclass refuses
        raise ManifestError(f"quantization: {exc}") from None


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, "manifest_version": MANIFEST_VERSION, **manifest}
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


@contextlib.contextmanager
def staged_folder(out: Path, prefix: str):
    """Yield an empty folder beside ``out`` to write a model folder into; when the block ends
    without an error it replaces ``out`` (``publish_folder``), otherwise it is removed."""
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield tmp
        publish_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(staged: Path, out: Path) -> None:
    """Move a fully written model folder from its staging place (a ``mkdtemp`` folder beside
    ``out``) into place, replacing ``out``. Permissions become 0755/0644: mkdtemp's 0700 and the
    0600 data files onnx writes would hide the model from a serving account."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    staged.chmod(0o755)
    for path in staged.iterdir():
        path.chmod(0o644)
    staged.rename(out)
