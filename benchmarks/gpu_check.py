"""The prepared command for a lent GPU machine (docs/gpu.md): the GPU matrix of
editreward_bench.gpu_matrix (``--help`` lists its options), from a bare checkout.

    python benchmarks/gpu_check.py              # on the GPU: full-size random-weight model, < 8 minutes
    python benchmarks/gpu_check.py --dry-run    # the same run on the tiny fixture and the CPU (what CI runs)

It checks the libraries every row needs before importing any of this project's code (so a
missing one is named, not a traceback), then runs the matrix with the repository's source
folders on the path (no install needed) and copies its output to a log. The JSON results and the
log go under ``$OUT`` when it is set (only ``$OUT`` comes back from the device machine), else to
``--out`` (default results/gpu-check.json) and the same name ending in ``.log``.

Exit codes: 0 every row measured or skipped for a named reason; 1 a row failed or failed parity
(it is still timed and in the JSON); 2 aborted (a library every row needs is missing, or the reference failed).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("runtime", "export", "quantize", "benchmarks")
# module -> the pip package that provides it: what every row imports. A row's own libraries
# (bitsandbytes, gptqmodel, onnxruntime-gpu) are checked by the matrix's plan, which skips that row.
REQUIRED = {"numpy": "numpy", "PIL": "pillow", "tokenizers": "tokenizers", "jinja2": "jinja2",
            "safetensors": "safetensors", "torch": "torch", "transformers": "transformers"}
EXIT_ABORTED = 2


def missing_modules() -> list[str]:
    """``"module (pip install package)"`` for each required module that does not import. Importing,
    not just finding, catches a broken install as well as an absent one."""
    missing = []
    for module, package in REQUIRED.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a native library that fails to load
            missing.append(f"{module} (pip install {package}: {type(exc).__name__}: {exc})")
    return missing


def output_paths(out: str) -> tuple[Path, Path]:
    """(JSON, log): under ``$OUT`` when set (keeping ``out``'s file name), else ``out`` and its ``.log``."""
    path = Path(out)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / path.name
    return path, path.with_suffix(".log")


def _copy(stream, sink, log, lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sink.write(line)
            sink.flush()
            log.write(line)
            log.flush()


def run_matrix(args: list[str], log_path: Path) -> int:
    """editreward_bench.gpu_matrix in a child process, its stdout and stderr copied to ours and to the log."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / d) for d in SOURCES] + [p for p in [env.get("PYTHONPATH")] if p])
    command = [sys.executable, "-m", "editreward_bench.gpu_matrix", *args]
    lock = threading.Lock()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        copiers = [threading.Thread(target=_copy, args=(stream, sink, log, lock))
                   for stream, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in copiers:
            t.start()
        code = proc.wait()
        for t in copiers:
            t.join()
        log.write(f"exit code {code}\n")
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", default="results/gpu-check.json")
    known, rest = parser.parse_known_args(argv)
    out, log_path = output_paths(known.out)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    missing = missing_modules()
    if missing:
        message = "ABORT: missing what every row needs:\n  " + "\n  ".join(missing)
        print(message, file=sys.stderr)
        log_path.write_text(message + "\n", encoding="utf-8")
        return EXIT_ABORTED
    return run_matrix([*rest, "--out", str(out)], log_path)


if __name__ == "__main__":
    sys.exit(main())
