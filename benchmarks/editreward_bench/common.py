"""Shared pieces of the benchmarks: one versioned results schema, environment capture,
variant loading, and generated inputs of realistic size."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from editreward_rt.hardware import DTYPE_PRECISIONS, PRECISIONS, dtype_of
from editreward_rt.manifest import MANIFEST, read_manifest

SCHEMA = "editreward-bench-results"
SCHEMA_VERSION = 1
REFERENCE = "torch-reference"
# A backend description's precision (fp32, bf16, fp16) -> the dtype the tolerance table keys it by.
PRECISION_DTYPE = {precision: dtype for dtype, precision in DTYPE_PRECISIONS.items()}


def tolerance_key(description: dict) -> tuple[str, str]:
    """A fast scorer's description -> its (backend, precision or scheme) row of the tolerance table."""
    if description["backend"] == "torch":
        return "torch-fast", description.get("quantization", description["dtype"])
    return description["backend"], description.get("quantization") or dtype_of(description.get("precision") or "fp32")


def environment(device: str = "cpu") -> dict:
    """Device, CPU/GPU model and library versions recorded with every number."""
    env = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "device": device, "libraries": {}}
    for name in ("numpy", "torch", "transformers", "onnxruntime", "onnx", "tokenizers", "bitsandbytes", "gptqmodel"):
        try:
            module = __import__(name)
            env["libraries"][name] = getattr(module, "__version__", "?")
        except ImportError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except ImportError:
        pass
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def results_document(kind: str, config: dict, results: list[dict], device: str) -> dict:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "environment": environment(device),
            "config": config, "results": results}


def validate_document(doc: dict) -> None:
    """Raise ValueError when a results file does not follow the schema."""
    required = {"schema", "schema_version", "kind", "created", "command", "environment", "config", "results"}
    missing = required - set(doc)
    if missing:
        raise ValueError(f"results file lacks {sorted(missing)}")
    if doc["schema"] != SCHEMA or doc["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"unknown results schema {doc['schema']} v{doc['schema_version']}")
    if doc["kind"] not in ("latency", "parity", "rl", "cpu-speed"):
        raise ValueError(f"unknown results kind {doc['kind']!r}")
    for result in doc["results"]:
        if "variant" not in result or "status" not in result:
            raise ValueError(f"result without variant/status: {result}")


def write_document(doc: dict, path: str | Path) -> Path:
    """Write a results file atomically (a temporary file renamed over it): a run killed mid-write
    leaves the previous complete file, so writing after every variant keeps what finished."""
    validate_document(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, path)
    return path


def gate_tolerance(backend: str, precision: str, reference_dtype: str = "float32"):
    """The bound a variant computing in ``precision`` (a dtype or a quantization scheme) on ``backend``
    is held to against a reference run in ``reference_dtype``: its TOLERANCES row, widened by the
    reference's own rounding (the bf16 torch row) when the reference is not float32."""
    from editreward_rt.tolerances import Tolerance, tolerance

    tol = tolerance(backend, precision)
    if reference_dtype == "float32":
        return tol
    ref = tolerance("torch-fast", reference_dtype)
    return Tolerance(max(tol.mu, ref.mu), max(tol.log_sigma, ref.log_sigma), min(tol.agreement, ref.agreement))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def checkpoint_variants() -> dict[str, tuple[str, str]]:
    """``BACKEND-MODE`` labels of the registry's backends that read checkpoints -> (backend, mode):
    ``torch-reference`` and ``torch-fast`` today."""
    from editreward_rt.backends import BACKENDS

    return {f"{e.name}-{m}": (e.name, m) for e in BACKENDS.values() if "checkpoint" in e.reads for m in e.modes}


@dataclass(frozen=True)
class Variant:
    """A ``checkpoint_variants`` label (``torch-reference``, ``torch-fast``), or ``model:PATH`` /
    ``onnx:PATH``: an exported model folder (float, quantized ONNX, or bitsandbytes-quantized torch),
    run by the backend its manifest names, or ``BACKEND:PATH`` (``openvino:PATH``): the folder on
    that backend. ``@PRECISION`` after any of them (``torch-fast@bf16``, ``openvino:PATH@fp32``)
    asks for a precision (``hardware.PRECISIONS``); without it the variant runs its default."""

    label: str

    @property
    def precision(self) -> str | None:
        _, sep, tail = self.label.rpartition("@")
        return tail if sep and tail in PRECISIONS else None

    @property
    def name(self) -> str:
        """The label without its ``@PRECISION``."""
        return self.label.rpartition("@")[0] if self.precision else self.label

    @property
    def backend(self) -> str | None:
        """The backend a ``BACKEND:PATH`` label names; None for the others."""
        from editreward_rt.backends import BACKENDS

        prefix, sep, _ = self.name.partition(":")
        return prefix if sep and prefix in BACKENDS else None

    @property
    def path(self) -> str | None:
        prefix, sep, rest = self.name.partition(":")
        return rest if sep and (prefix in ("model", "onnx") or self.backend) else None

    def backend_name(self) -> str:
        """The backend the variant runs on: named, the checkpoint variant's, or the folder's manifest's
        (a float ONNX folder is run on the engine its manifest names, not on the CPU default)."""
        from editreward_rt.backends import DEFAULT_EXPORTED

        known = checkpoint_variants()
        if self.name in known:
            return known[self.name][0]
        if not self.path:
            raise ValueError(f"unknown variant {self.label!r}: use {', '.join(known)}, model:PATH or BACKEND:PATH, "
                             "each optionally @PRECISION")
        return self.backend or read_manifest(Path(self.path)).get("runtime", DEFAULT_EXPORTED)

    def load(self, ckpt: str, base: str | None, prompts_from: str | None, device: str, threads: int | None,
             dtype: str | None = None):
        """``dtype``: what the torch variants compute in (default float32 on a CPU, bfloat16 on a GPU)
        unless the label asks for a precision."""
        from editreward_rt import Scorer

        backend = self.backend_name()
        if self.path:
            return Scorer.load(self.path, backend=backend, device=device, threads=threads, precision=self.precision)
        dtype = None if self.precision else dtype or ("float32" if device == "cpu" else "bfloat16")
        return Scorer.load(ckpt, backend=backend, mode=checkpoint_variants()[self.name][1], base=base,
                           prompts_from=prompts_from, device=device, threads=threads, dtype=dtype, precision=self.precision)

    def tolerance_key(self, scorer) -> tuple[str, str]:
        """(backend, precision or quantization scheme): the row of editreward_rt.tolerances.TOLERANCES,
        from the dtype the variant actually ran in, never from its name."""
        if not self.path:
            return ("torch-fast", scorer.description["dtype"])
        manifest, ran = scorer.backend.model.manifest, scorer.description.get("precision")
        scheme = (manifest.get("quantization") or {}).get("scheme")
        return (scorer.description["backend"], scheme or PRECISION_DTYPE.get(ran) or manifest.get("precision", "float32"))


# Placeholder rubric text of about the real rubrics' length (a few hundred tokens each);
# the real wording is model data fetched at export time and never part of this project.
_FILLER = ("Judge the edited picture against the source picture and the instruction. Consider whether the "
           "requested change is present, whether anything else changed, and whether the result looks natural. ")


def write_benchmark_prompts(folder: Path, repeats: int = 5) -> Path:
    """Upstream-format prompt files with rubric bodies of realistic length."""
    dataset = folder / "EditReward" / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    body = _FILLER * repeats
    (dataset / "prompts.py").write_text(
        f'INSTRUCTION_EDIT_FOLLOWING = """\nRubric one. {body}\nText instruction - {{text_prompt}}\n"""\n'
        f'INSTRUCTION_EDIT_QUALITY = """\nRubric two. {body}\nText instruction - {{text_prompt}}\n"""\n', encoding="utf-8")
    (dataset / "data_collator_qwen_edit.py").write_text(
        'prompt_with_special_token = """\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"""\n',
        encoding="utf-8")
    return folder


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Photo-sized RGB arrays of varied aspect ratio (each becomes about 256 image tokens)."""
    rng = np.random.default_rng(seed)
    shapes = [(480, 640), (768, 512), (512, 512), (360, 1280), (1024, 768), (600, 800)]
    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx * yy) / (w * h)], axis=-1) * rng.uniform(120, 230, 3)
        out.append((base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8))
    return out


INSTRUCTIONS = ["Add a green bowl on the branch", "Make the sky look like a sunset", "Remove the person on the left",
                "Turn the car red", "Replace the apples with oranges", "Make it look like a watercolor painting"]


def synthetic_groups(n_groups: int, edits_per_source: int, seed: int = 0) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    """(instruction, source, edits) groups: edits share a source, as in ranking and preference data."""
    images = synthetic_images(n_groups * (edits_per_source + 1), seed)
    groups = []
    for g in range(n_groups):
        chunk = images[g * (edits_per_source + 1) : (g + 1) * (edits_per_source + 1)]
        groups.append((INSTRUCTIONS[g % len(INSTRUCTIONS)], chunk[0], chunk[1:]))
    return groups


def add_model_args(parser, out: str) -> None:
    """The flags latency.py and parity.py share: what to load, where, and where results go."""
    parser.add_argument("--ckpt", help="checkpoint (default: a generated fixture, see --fixture)")
    parser.add_argument("--base", help="base model hub id or folder")
    parser.add_argument("--prompts-from", help="upstream clone holding the rubric prompts")
    parser.add_argument("--fixture", choices=("tiny", "small"), default="small")
    parser.add_argument("--workdir", default="results/work", help="where generated fixtures and exports are kept")
    parser.add_argument("--variant", action="append",
                        help="torch-fast | model:PATH (an exported or quantized folder; repeatable); the reference always runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out)


def resolve_model_args(args) -> None:
    """Without --ckpt: a generated fixture, its fp32 export, and the default variants."""
    if args.ckpt is None:
        paths = ensure_fixture(Path(args.workdir), args.fixture)
        args.ckpt, args.prompts_from = paths["ckpt"], args.prompts_from or paths["prompts_from"]
        args.variant = args.variant or ["torch-fast", f"model:{paths['onnx']}"]
    args.variant = args.variant or []


def ensure_fixture(workdir: Path, size: str, export: bool = True) -> dict:
    """A generated checkpoint (and its fp32 ONNX export) with realistic-length prompts, reused across runs."""
    from editreward_rt.families import DEFAULT_FAMILY, family

    root = workdir / f"fixture-{size}"
    prompts = root / "bench-prompts"
    if not (root / "checkpoint").is_dir():
        family(DEFAULT_FAMILY).write_fixture(root, size=size, seed=0)
    if not prompts.is_dir():
        write_benchmark_prompts(prompts)
    paths = {"ckpt": str(root / "checkpoint"), "prompts_from": str(prompts), "onnx": str(root / "onnx-fp32")}
    if export and not (root / "onnx-fp32" / MANIFEST).is_file():
        from editreward_export.onnx_export import export_onnx

        export_onnx(paths["ckpt"], paths["onnx"], prompts_from=paths["prompts_from"], log=lambda m: print(m, file=sys.stderr))
    return paths


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_cli(model: str, flags: list[str], ready_s: float = 300.0):
    """``editreward serve --model MODEL FLAGS`` in a child process on a free loopback port, once its
    ``/readyz`` answers 200 -> (base URL, the process). Afterwards a process still running gets
    SIGTERM (its graceful stop), then is killed if it has not exited within a minute."""
    port = free_port()
    command = [sys.executable, "-c", "from editreward_rt.cli import main; raise SystemExit(main())", "serve",
               "--model", model, "--port", str(port), *flags]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + ready_s
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"editreward serve did not become ready in {ready_s:g} s:\n"
                                       + log.read().decode(errors="replace")[-2000:])
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=5):
                        break
                except OSError:  # not listening yet, or not ready (an HTTP error is an OSError too)
                    time.sleep(0.3)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
