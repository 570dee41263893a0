"""``editreward``: score triples from the command line, write test fixtures, run the demo."""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path

from . import backends
from .errors import EditRewardError, InputError, OutputError
from .extras import require
from .families import DEFAULT_FAMILY, family
from .hardware import PRECISIONS
from .jsonl import TRIPLE_FIELDS, is_blank, not_regular, parse_record, parse_triple, read_lines, resolve


def _progress(total: int | None, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with huggingface-hub; stay usable without it
        return None
    return tqdm(total=total, initial=initial, unit="triple", file=sys.stderr, dynamic_ncols=True)


RECORD_START = b'{"index": '  # how every results line begins (json.dumps of _result, index first)


def _not_ours(line: bytes, inputs: dict[int, bytes], done: dict[int, int]) -> str | None:
    """Why ``line`` is not a results record of this input, or None. ``inputs``: the input's
    non-blank lines by index; ``done``: the indices read so far -> their line number."""
    try:
        record = parse_record(line)
    except InputError as exc:
        return str(exc)
    index = record.get("index")
    if type(index) is not int:
        return "has no integer index"
    if index not in inputs:
        return f"has index {index}, which is no triple line of the input"
    if index in done:
        return f"repeats index {index} of line {done[index]}"
    is_number = lambda key: type(record.get(key)) in (int, float)  # noqa: E731  (a bool is no score)
    if "error" in record:
        error = record["error"]
        fields = isinstance(error, dict) and all(isinstance(error.get(k), str) for k in ("type", "message"))
        return None if fields and "mu" not in record else "is not an error record ({index, error: {type, message}})"
    if not (is_number("mu") and is_number("log_sigma")):
        return "is neither a score (mu, log_sigma) nor an error"
    try:
        triple = parse_triple(inputs[index])
    except InputError:
        return f"holds a score for index {index}, whose input line is no triple"
    if any(record.get(k) != triple[k] for k in TRIPLE_FIELDS):
        return f"scores another triple than the input's index {index}"
    return None


def _torn(tail: bytes) -> bool:
    """Whether an unterminated last line is what a crash mid-write leaves: a strict prefix of a record."""
    try:
        parse_record(tail)
    except InputError:
        return tail[: len(RECORD_START)] == RECORD_START[: len(tail)]
    return False  # a whole JSON object is no tear


def _done_indices(output: Path, lines: list[bytes]) -> set[int]:
    """Indices already written by an earlier, interrupted run, checked before anything is appended.
    A crash mid-write tears the last line only (no newline, a prefix of a record): it is cut, and a
    whole last record without its newline gets one. Any other line that is not a record of this
    input's triples (another file's line, another input's results, a repeated index) is refused,
    naming the line: kept, it would count as done and its triple never be scored; cut, it would be lost."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    inputs = {i: line for i, line in enumerate(lines) if not is_blank(line)}
    rows = data.split(b"\n")
    tail = rows[-1]  # after the last newline: empty, or a line that lacks its newline
    done: dict[int, int] = {}
    cut = False
    for number, line in enumerate(rows):
        if number == 0:
            line = line.removeprefix(codecs.BOM_UTF8)  # an editor's byte-order mark
        last = number == len(rows) - 1
        if is_blank(line) or (last and _torn(line)):
            cut = cut or last
            continue
        problem = _not_ours(line, inputs, done)
        if problem is not None:
            raise InputError(f"--output {output} line {number + 1} {problem}: it is not a result of this --input, so "
                             "refusing to resume into the file (left as it is); give a new --output, or remove that line")
        done[parse_record(line)["index"]] = number + 1
    # Appending must start a line: a torn or blank tail goes, a whole last record gets its newline.
    kept = data[: len(data) - len(tail)] if cut else data + b"\n" if tail else data
    if kept != data:
        staged = output.with_name(f".{output.name}.resume")
        try:
            staged.write_bytes(kept)
            staged.replace(output)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise OutputError(f"cannot rewrite --output {output} to resume it: {exc.strerror or exc}") from None
    return set(done)


def _result(index: int, record: dict | None, outcome, engine: str) -> dict:
    if isinstance(outcome, EditRewardError):
        return {"index": index, "error": outcome.to_dict()}
    fields = {k: record[k] for k in TRIPLE_FIELDS} if record else {}
    return {"index": index, **outcome.to_dict(), **fields, "backend": engine}


def _groups(triples: list[tuple]) -> list[tuple]:
    """Consecutive (index, (instruction, source, edited)) with one instruction and source ->
    (indices, (instruction, source, [edited, ...])): a ranked set's source is encoded once."""
    out = []
    for i, (instruction, source, edited) in triples:
        if out and out[-1][1][:2] == (instruction, source):
            out[-1][0].append(i)
            out[-1][1][2].append(edited)
        else:
            out.append(([i], (instruction, source, [edited])))
    return out


class _Results:
    """The results file, appended to a chunk at a time; a failed write (a full disk, a lost mount)
    is an ``OutputError``: the lines written before stay, and a rerun resumes after them."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write --output {self.path}: {exc.strerror or exc}; the results written before "
                           "stay, and a rerun resumes after them")

    def append(self, results: list[dict]) -> None:
        try:
            self.file.write("".join(json.dumps(r) + "\n" for r in results))
            self.file.flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def __enter__(self) -> "_Results":
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            self.file.close()  # after a failed write this retries the unwritten rest, and fails again
        except OSError as exc:
            if kind is None:  # else that failure is already being raised, typed
                raise self._failed(exc) from None


def score_file(scorer, input_path: Path, output_path: Path, chunk: int | None = None) -> dict:
    """Score every line of a JSONL file, ``chunk`` lines at a time (default: a BatchingScorer's merge
    width, or the scorer's per-call size if larger); resumable; one error record per bad line.
    Consecutive lines with the same instruction and source are scored as one group."""
    from .batching import MERGE_WIDTH

    chunk = chunk or max(MERGE_WIDTH, scorer.max_batch)
    lines = read_lines(input_path)
    done = _done_indices(output_path, lines)
    todo = [i for i, line in enumerate(lines) if i not in done and not is_blank(line)]
    bar = _progress(len(todo) + len(done), len(done))
    counts = {"scored": 0, "errors": 0, "skipped": len(done)}
    try:
        with _Results(output_path) as out:
            for start in range(0, len(todo), chunk):
                batch = todo[start : start + chunk]
                records, triples, outcomes = {}, [], {}
                for i in batch:
                    try:
                        records[i] = parse_triple(lines[i])
                        triples.append((i, resolve(records[i], input_path.parent)))
                    except EditRewardError as exc:
                        outcomes[i] = exc
                groups = _groups(triples)
                for (indices, _), results in zip(groups, scorer.score_groups([g for _, g in groups], errors="return")):
                    outcomes.update(zip(indices, results))
                results = [_result(i, records.get(i), outcomes[i], scorer.engine) for i in batch]
                out.append(results)
                for result in results:
                    counts["errors" if "error" in result else "scored"] += 1
                if bar is not None:
                    bar.update(len(batch))
    finally:  # the bar's line ends before any error is printed
        if bar is not None:
            bar.close()
    return counts


def _check_batch_paths(input_path: Path, output_path: Path) -> None:
    """Usage errors as typed errors, before any model is loaded."""
    problem = not_regular(input_path)
    if problem is not None:
        raise InputError(f"--input {input_path}: {problem}")
    if output_path.is_dir():
        raise InputError(f"--output {output_path} is a directory; give the JSONL results file to write")
    if not output_path.parent.is_dir():
        raise InputError(f"--output {output_path}: the folder {output_path.parent} does not exist")
    if output_path.resolve() == input_path.resolve():
        raise InputError("--output must not be the --input file")


def load_scorer(args):
    """The Scorer ``editreward score``'s arguments ask for."""
    from .scorer import Scorer

    return Scorer.load(args.model, backend=args.backend, mode=args.mode, base=args.base, prompts_from=args.prompts_from,
                       device=args.device, threads=args.threads, max_batch=args.max_batch, memory=args.memory,
                       precision=args.precision, options=dict(args.backend_option))


def cmd_score(args) -> int:
    single = args.instruction is not None
    if single == (args.input is not None):
        raise SystemExit("give either --instruction/--source/--edited or --input/--output")
    if single and (args.source is None or args.edited is None):
        raise SystemExit("--instruction needs --source and --edited")
    if not single and args.output is None:
        raise SystemExit("--input needs --output")
    if not single:
        _check_batch_paths(Path(args.input), Path(args.output))
    scorer = load_scorer(args)
    if single:
        record = {"instruction": args.instruction, "source": args.source, "edited": args.edited}
        try:
            score = scorer.score(args.instruction, args.source, args.edited)
        except EditRewardError as exc:
            print(json.dumps({"error": exc.to_dict(), **record}))
            return 2
        print(json.dumps({**score.to_dict(), **record, "backend": scorer.engine}))
        return 0
    counts = score_file(scorer, Path(args.input), Path(args.output))
    print(json.dumps(counts), file=sys.stderr)
    return 0


def cmd_make_fixture(args) -> int:
    for module in ("safetensors", *(("ml_dtypes",) if args.dtype == "bfloat16" or args.size == "full" else ())):
        require(module, "dev" if module == "ml_dtypes" else "torch", "editreward make-fixture")
    paths = family(DEFAULT_FAMILY).write_fixture(args.out, size=args.size, seed=args.seed, weight_format=args.format,
                                                 dtype=args.dtype)
    print(json.dumps({k: str(v) for k, v in paths.__dict__.items()}, indent=1))
    return 0


def cmd_demo(args) -> int:
    run_demo = require("editreward_export.demo", "export", "editreward demo").run_demo
    run_demo(Path(args.workdir), size=args.size)
    return 0


# The build-time tools, each a subcommand too: (module with ``main(argv)``, extra, what it does).
TOOLS = {
    "export": {
        "onnx": ("editreward_export.onnx_export", "export", "export a checkpoint to ONNX graphs (export/build_onnx.py)"),
        "trt": ("editreward_trt.build", "export", "export and build TensorRT engines (export/build_trt.py)"),
        "check-trt-ops": ("editreward_trt.ops", "export", "check graphs against TensorRT's ONNX parser (export/check_trt_ops.py)"),
    },
    "quantize": ("editreward_quant.cli", "quant", "quantize a checkpoint or exported folder (quantize/quantize.py)"),
    "bench": {
        "latency": ("editreward_bench.latency", "bench", "latency with a parity gate (benchmarks/latency.py)"),
        "parity": ("editreward_bench.parity_bench", "bench", "accuracy parity (benchmarks/parity.py)"),
        "report": ("editreward_bench.report", "bench", "tables and plots from result files (benchmarks/report.py)"),
        "serve": ("editreward_bench.serve_bench", "serve", "HTTP serving throughput (benchmarks/serve_bench.py)"),
        "sizes-7b": ("editreward_bench.sizes_7b", "quant", "quantized sizes at the 7B's shapes (benchmarks/sizes_7b.py)"),
        "sizes": ("editreward_quant.sizes", "quant", "decoder weight bytes of model folders against bf16"),
        "quant": ("editreward_bench.quant_report", "quant", "fidelity and size per scheme (benchmarks/quant_report.py)"),
        "resize-gap": ("editreward_bench.resize_gap", "torch", "bilinear against bicubic resize (benchmarks/resize_gap.py)"),
        "rl": ("editreward_bench.rl_bench", "bench", "RL reward scoring: serial, batched, grouped (benchmarks/rl_bench.py)"),
        "reliability": ("editreward_bench.reliability", "serve", "hostile and careless requests against a live service (benchmarks/reliability.py)"),
        "gpu": ("editreward_bench.gpu_matrix", "torch", "the GPU matrix (benchmarks/gpu_check.py)"),
        "gpu-trt": ("editreward_bench.gpu_trt", "trt", "the TensorRT GPU check (benchmarks/gpu_trt_check.py)"),
    },
}


def cmd_tool(args) -> int:
    module, extra, what = args.tool
    return require(module, extra, f"editreward {args.command}").main(args.argv)


def _serve_commands(ray: bool = True):
    """The serving subcommands' module, imported only when one of them runs; a BackendError naming
    the serve extra when what they need (Ray, or for one process only FastAPI and uvicorn) is missing."""
    from .serve import require_http, require_ray

    if ray:
        require_ray()
    else:
        require_http()
    from .serve import commands

    return commands


def cmd_serve(args) -> int:
    return _serve_commands(ray=not args.single_process).cmd_serve(args)


def cmd_batch(args) -> int:
    return _serve_commands().cmd_batch(args)


def backend_option(text: str) -> tuple[str, bool | int | str]:
    """``KEY=VALUE`` -> (key, value): ``true``/``false`` as a bool, an integer as an int, else the text."""
    key, sep, value = text.partition("=")
    known = backends.option_names()
    if not sep or key not in known:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with KEY one of {', '.join(known)}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    try:
        return key, int(value)
    except ValueError:
        return key, value


def add_precision_argument(p) -> None:
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto (the default, or $EDITREWARD_PRECISION): bf16 where the device computes it natively "
                        "(AMX or AVX512-BF16 on a CPU, a current GPU), fp32 elsewhere; fp32: the reference's own, "
                        "to the float32 tolerance")


def add_backend_option(p) -> None:
    p.add_argument("--backend-option", type=backend_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the backend's load, repeatable (e.g. io_binding=true for onnxruntime, "
                        "cuda_graphs=true for tensorrt, compile=reduce-overhead for torch); one the backend does not take is an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editreward", description="EditReward triple scoring.")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score one triple or a JSONL file of triples")
    score.add_argument("--model", required=True, help="checkpoint (hub id or folder) or exported model folder")
    score.add_argument("--backend", choices=backends.names(),
                       help="default: torch for a checkpoint; for a float ONNX folder on a CPU the fastest engine "
                            "installed (backends.cpu_engine), else the runtime the folder names")
    add_precision_argument(score)
    score.add_argument("--mode", choices=backends.MODES, default="fast")
    score.add_argument("--base", help="base model hub id or folder (torch backend)")
    score.add_argument("--prompts-from", help="local clone of the upstream repository (torch backend)")
    score.add_argument("--device", default="cpu", help="cpu or cuda")
    score.add_argument("--threads", type=int)
    score.add_argument("--max-batch", type=int,
                       help="triples per model call (default: 1 on a CPU, where batches only add padding, 8 on a GPU: "
                            "backends.default_max_batch); edits of one source share its encoding at any size")
    add_backend_option(score)
    memory = score.add_mutually_exclusive_group()
    memory.add_argument("--resident", dest="memory", action="store_const", const="resident",
                        help="torch backend: weights stay on the GPU (the default)")
    memory.add_argument("--per-call", dest="memory", action="store_const", const="per-call",
                        help="torch backend: weights in host memory, copied to the GPU for each call and freed after")
    score.set_defaults(memory=None)  # not given: the backend's default (resident, for torch)
    score.add_argument("--instruction")
    score.add_argument("--source")
    score.add_argument("--edited")
    score.add_argument("--input", help="JSONL of {instruction, source, edited}; paths relative to the file")
    score.add_argument("--output", help="JSONL results; an existing file is resumed")
    score.set_defaults(func=cmd_score)

    fixture = sub.add_parser("make-fixture", help="write a random-weight checkpoint in the upstream layout")
    fixture.add_argument("--out", required=True)
    fixture.add_argument("--size", choices=family(DEFAULT_FAMILY).FIXTURE_SIZES, default="tiny")
    fixture.add_argument("--seed", type=int, default=0)
    fixture.add_argument("--format", choices=("safetensors", "sharded"),
                         help="default: one safetensors file; sharded for --size full, as published")
    fixture.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32; bfloat16 for --size full")
    fixture.set_defaults(func=cmd_make_fixture)

    demo = sub.add_parser("demo", help="build a random checkpoint, export it to ONNX and score a triple")
    demo.add_argument("--workdir", default="editreward-demo")
    demo.add_argument("--size", choices=family(DEFAULT_FAMILY).FIXTURE_SIZES, default="small")
    demo.set_defaults(func=cmd_demo)

    from .serve.args import add_batch_arguments, add_serve_arguments

    serve = sub.add_parser("serve", help="serve the HTTP scoring API on Ray Serve, or in one process "
                           "(--single-process; needs the serve extra)")
    add_serve_arguments(serve)
    add_precision_argument(serve)
    add_backend_option(serve)
    serve.set_defaults(func=cmd_serve)

    batch = sub.add_parser("batch", help="score a JSONL/Parquet file of triples with Ray Data (needs the serve extra)")
    add_batch_arguments(batch)
    add_precision_argument(batch)
    add_backend_option(batch)
    batch.set_defaults(func=cmd_batch)

    for name, tool in TOOLS.items():
        if isinstance(tool, tuple):
            p = sub.add_parser(name, help=tool[2], add_help=False)
            p.set_defaults(func=cmd_tool, tool=tool)
        else:
            p = sub.add_parser(name, help=f"{name} tools: {', '.join(tool)}")
            tools = p.add_subparsers(dest="tool_name", required=True)
            for sub_name, entry in tool.items():
                tools.add_parser(sub_name, help=entry[2], add_help=False).set_defaults(func=cmd_tool, tool=entry)
    return parser


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.func is not cmd_tool and rest:
        build_parser().parse_args(argv)  # the usual error for unknown arguments
    args.argv = rest
    try:
        return args.func(args)
    except EditRewardError as exc:
        print(f"editreward: {exc.kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
