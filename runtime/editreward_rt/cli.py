"""``editreward``: score triples from the command line, write test fixtures, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EditRewardError, InputError

TRIPLE_FIELDS = ("instruction", "source", "edited")


def _progress(total: int | None, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with huggingface-hub; stay usable without it
        return None
    return tqdm(total=total, initial=initial, unit="triple", file=sys.stderr, dynamic_ncols=True)


def _done_indices(output: Path) -> set[int]:
    """Indices already written by an earlier, interrupted run (a torn last line is dropped)."""
    done = set()
    if not output.is_file():
        return done
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    good = []
    for line in lines:
        try:
            done.add(int(json.loads(line)["index"]))
            good.append(line)
        except (ValueError, KeyError, TypeError):
            break  # everything after a torn write is rewritten
    if len(good) != len(lines):
        output.write_text("".join(good), encoding="utf-8")
    return done


def _parse_line(line: str, base: Path) -> dict:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise InputError(f"line is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise InputError("line is not a JSON object")
    missing = [f for f in TRIPLE_FIELDS if f not in record]
    if missing:
        raise InputError(f"line lacks {', '.join(missing)}")
    for field in ("source", "edited"):
        if not isinstance(record[field], str):
            raise InputError(f"{field} must be a path string")
    return record


def _resolve(record: dict, base: Path) -> tuple:
    return record["instruction"], base / record["source"], base / record["edited"]


def _result(index: int, record: dict | None, outcome) -> dict:
    if isinstance(outcome, EditRewardError):
        return {"index": index, "error": outcome.to_dict()}
    fields = {k: record[k] for k in TRIPLE_FIELDS} if record else {}
    return {"index": index, **outcome.to_dict(), **fields}


def score_file(scorer, input_path: Path, output_path: Path, chunk: int = 8) -> dict:
    """Score every line of a JSONL file; resumable; one error record per bad line."""
    lines = input_path.read_text(encoding="utf-8").splitlines()
    done = _done_indices(output_path)
    todo = [i for i, line in enumerate(lines) if i not in done and line.strip()]
    bar = _progress(len(todo) + len(done), len(done))
    counts = {"scored": 0, "errors": 0, "skipped": len(done)}
    with open(output_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            records, triples, outcomes = {}, [], {}
            for i in batch:
                try:
                    records[i] = _parse_line(lines[i], input_path.parent)
                    triples.append((i, _resolve(records[i], input_path.parent)))
                except EditRewardError as exc:
                    outcomes[i] = exc
            for (i, _), res in zip(triples, scorer.score_batch([t for _, t in triples], errors="return")):
                outcomes[i] = res
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


def cmd_score(args) -> int:
    from .scorer import Scorer

    single = args.instruction is not None
    if single == (args.input is not None):
        raise SystemExit("give either --instruction/--source/--edited or --input/--output")
    if single and (args.source is None or args.edited is None):
        raise SystemExit("--instruction needs --source and --edited")
    if not single and args.output is None:
        raise SystemExit("--input needs --output")
    scorer = Scorer.load(args.model, backend=args.backend, mode=args.mode, base=args.base, prompts_from=args.prompts_from,
                         device=args.device, threads=args.threads, max_batch=args.max_batch)
    if single:
        record = {"instruction": args.instruction, "source": args.source, "edited": args.edited}
        try:
            score = scorer.score(args.instruction, args.source, args.edited)
        except EditRewardError as exc:
            print(json.dumps({"error": exc.to_dict(), **record}))
            return 2
        print(json.dumps({**score.to_dict(), **record}))
        return 0
    counts = score_file(scorer, Path(args.input), Path(args.output), chunk=args.max_batch)
    print(json.dumps(counts), file=sys.stderr)
    return 0


def cmd_make_fixture(args) -> int:
    from .fixtures import write_fixture

    paths = write_fixture(args.out, size=args.size, seed=args.seed, weight_format=args.format, dtype=args.dtype)
    print(json.dumps({k: str(v) for k, v in paths.__dict__.items()}, indent=1))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.workdir), size=args.size)
    return 0


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
    score.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"),
                       help="default: onnxruntime for an exported folder, torch for a checkpoint")
    score.add_argument("--mode", choices=("fast", "reference"), default="fast")
    score.add_argument("--base", help="base model hub id or folder (torch backend)")
    score.add_argument("--prompts-from", help="local clone of the upstream repository (torch backend)")
    score.add_argument("--device", default="cpu", help="cpu or cuda")
    score.add_argument("--threads", type=int)
    score.add_argument("--max-batch", type=int, default=8)
    score.add_argument("--instruction")
    score.add_argument("--source")
    score.add_argument("--edited")
    score.add_argument("--input", help="JSONL of {instruction, source, edited}; paths relative to the file")
    score.add_argument("--output", help="JSONL results; an existing file is resumed")
    score.set_defaults(func=cmd_score)

    fixture = sub.add_parser("make-fixture", help="write a random-weight checkpoint in the upstream layout")
    fixture.add_argument("--out", required=True)
    fixture.add_argument("--size", choices=("tiny", "small"), default="tiny")
    fixture.add_argument("--seed", type=int, default=0)
    fixture.add_argument("--format", choices=("safetensors", "sharded"), default="safetensors")
    fixture.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    fixture.set_defaults(func=cmd_make_fixture)

    demo = sub.add_parser("demo", help="build a random checkpoint, export it to ONNX and score a triple")
    demo.add_argument("--workdir", default="editreward-demo")
    demo.add_argument("--size", choices=("tiny", "small"), default="small")
    demo.set_defaults(func=cmd_demo)

    from .serve.args import add_batch_arguments, add_serve_arguments

    serve = sub.add_parser("serve", help="serve the HTTP scoring API on Ray Serve (needs the serve extra)")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    batch = sub.add_parser("batch", help="score a JSONL/Parquet file of triples with Ray Data (needs the serve extra)")
    add_batch_arguments(batch)
    batch.set_defaults(func=cmd_batch)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EditRewardError as exc:
        print(f"editreward: {exc.kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
