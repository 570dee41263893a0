"""``editreward``: score triples from the command line, write test fixtures, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import backends
from .errors import EditRewardError, InputError
from .extras import require
from .families import DEFAULT_FAMILY, family
from .jsonl import TRIPLE_FIELDS, is_blank, parse_record, parse_triple, read_lines, resolve


def _progress(total: int | None, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with huggingface-hub; stay usable without it
        return None
    return tqdm(total=total, initial=initial, unit="triple", file=sys.stderr, dynamic_ncols=True)


def _results_record(line: bytes) -> dict | None:
    """A complete results record (an index and a score or an error), or None."""
    try:
        record = parse_record(line)
        index = int(record["index"])
    except (EditRewardError, KeyError, TypeError, ValueError, OverflowError):
        return None
    return {**record, "index": index} if {"mu", "error"} & set(record) else None


def _done_indices(output: Path) -> set[int]:
    """Indices already written by an earlier, interrupted run. The file is cut back to its complete
    records (everything from the first line that is not one is rewritten; a complete last record
    that lacks its newline gets one), so appending keeps it valid JSONL with each index once. A
    file whose first line is not a results record is not ours to cut: refused."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    done, good = set(), []
    for number, line in enumerate(data.split(b"\n")):
        record = _results_record(line[3:] if number == 0 and line.startswith(b"\xef\xbb\xbf") else line)
        if record is None and number == 0 and line.strip():
            raise InputError(f"--output {output} holds something other than results; refusing to cut it: give a new "
                             "file, or an earlier run's results")
        if record is None or record["index"] in done:
            break  # a torn write, or a repeated index from another run's tear: what follows is rewritten
        done.add(record["index"])
        good.append(line + b"\n")
    kept = b"".join(good)
    if kept != data:
        staged = output.with_name(f".{output.name}.resume")
        staged.write_bytes(kept)
        staged.replace(output)
    return done


def _result(index: int, record: dict | None, outcome) -> dict:
    if isinstance(outcome, EditRewardError):
        return {"index": index, "error": outcome.to_dict()}
    fields = {k: record[k] for k in TRIPLE_FIELDS} if record else {}
    return {"index": index, **outcome.to_dict(), **fields}


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


def score_file(scorer, input_path: Path, output_path: Path, chunk: int = 8) -> dict:
    """Score every line of a JSONL file, ``chunk`` lines at a time; resumable; one error record per
    bad line. Consecutive lines with the same instruction and source are scored as one group."""
    lines = read_lines(input_path)
    done = _done_indices(output_path)
    todo = [i for i, line in enumerate(lines) if i not in done and not is_blank(line)]
    bar = _progress(len(todo) + len(done), len(done))
    counts = {"scored": 0, "errors": 0, "skipped": len(done)}
    with open(output_path, "a", encoding="utf-8") as out:
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
            for i in batch:
                result = _result(i, records.get(i), outcomes[i])
                counts["errors" if "error" in result else "scored"] += 1
                out.write(json.dumps(result) + "\n")
            out.flush()
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return counts


def _check_batch_paths(input_path: Path, output_path: Path) -> None:
    """Usage errors as typed errors, before any model is loaded."""
    if not input_path.is_file():
        raise InputError(f"--input {input_path}: " + ("is a directory, not a JSONL file" if input_path.is_dir()
                                                      else "no such file"))
    if output_path.is_dir():
        raise InputError(f"--output {output_path} is a directory; give the JSONL results file to write")
    if not output_path.parent.is_dir():
        raise InputError(f"--output {output_path}: the folder {output_path.parent} does not exist")
    if output_path.resolve() == input_path.resolve():
        raise InputError("--output must not be the --input file")


def cmd_score(args) -> int:
    from .scorer import Scorer

    single = args.instruction is not None
    if single == (args.input is not None):
        raise SystemExit("give either --instruction/--source/--edited or --input/--output")
    if single and (args.source is None or args.edited is None):
        raise SystemExit("--instruction needs --source and --edited")
    if not single and args.output is None:
        raise SystemExit("--input needs --output")
    if not single:
        _check_batch_paths(Path(args.input), Path(args.output))
    scorer = Scorer.load(args.model, backend=args.backend, mode=args.mode, base=args.base, prompts_from=args.prompts_from,
                         device=args.device, threads=args.threads, max_batch=args.max_batch, memory=args.memory)
    if single:
        record = {"instruction": args.instruction, "source": args.source, "edited": args.edited}
        try:
            score = scorer.score(args.instruction, args.source, args.edited)
        except EditRewardError as exc:
            print(json.dumps({"error": exc.to_dict(), **record}))
            return 2
        print(json.dumps({**score.to_dict(), **record}))
        return 0
    counts = score_file(scorer, Path(args.input), Path(args.output), chunk=max(8, scorer.max_batch))
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
        "gpu": ("editreward_bench.gpu_matrix", "torch", "the GPU matrix (benchmarks/gpu_check.py)"),
        "gpu-trt": ("editreward_bench.gpu_trt", "trt", "the TensorRT GPU check (benchmarks/gpu_trt_check.py)"),
    },
}


def cmd_tool(args) -> int:
    module, extra, what = args.tool
    return require(module, extra, f"editreward {args.command}").main(args.argv)


def _serve_commands():
    """The Ray subcommands' module, imported only when one of them runs."""
    from .serve import require_ray

    require_ray()  # a BackendError naming the serve extra when Ray is missing
    from .serve import commands

    return commands


def cmd_serve(args) -> int:
    return _serve_commands().cmd_serve(args)


def cmd_batch(args) -> int:
    return _serve_commands().cmd_batch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editreward", description="EditReward triple scoring.")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score one triple or a JSONL file of triples")
    score.add_argument("--model", required=True, help="checkpoint (hub id or folder) or exported model folder")
    score.add_argument("--backend", choices=backends.names(),
                       help="default: onnxruntime for an exported folder, torch for a checkpoint")
    score.add_argument("--mode", choices=backends.MODES, default="fast")
    score.add_argument("--base", help="base model hub id or folder (torch backend)")
    score.add_argument("--prompts-from", help="local clone of the upstream repository (torch backend)")
    score.add_argument("--device", default="cpu", help="cpu or cuda")
    score.add_argument("--threads", type=int)
    score.add_argument("--max-batch", type=int,
                       help="triples per model call (default: 1 on a CPU, where batches only add padding, 8 on a GPU: "
                            "Scorer.default_max_batch); edits of one source share its encoding at any size")
    memory = score.add_mutually_exclusive_group()
    memory.add_argument("--resident", dest="memory", action="store_const", const="resident",
                        help="torch backend: weights stay on the GPU (the default)")
    memory.add_argument("--per-call", dest="memory", action="store_const", const="per-call",
                        help="torch backend: weights in host memory, copied to the GPU for each call and freed after")
    score.set_defaults(memory="resident")
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

    serve = sub.add_parser("serve", help="serve the HTTP scoring API on Ray Serve (needs the serve extra)")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    batch = sub.add_parser("batch", help="score a JSONL/Parquet file of triples with Ray Data (needs the serve extra)")
    add_batch_arguments(batch)
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
