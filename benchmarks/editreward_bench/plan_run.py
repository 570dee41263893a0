"""Running a planned list of variants, each in its own process, within a time budget: the loop
the GPU scripts share.

Skips are decided before the loop (``reasons``); the results file is rewritten after every
variant; a reference that fails aborts the run, since nothing after it can be judged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import results_document, write_document
from .isolated import device_memory_reader, log

MIN_START_S = 20  # a variant is not started with less budget left than this
EXIT_FAILED, EXIT_ABORTED = 1, 2


@dataclass
class Step:
    key: str  # unique in the plan
    is_reference: bool
    float32_reference: str | None = None  # key of the float32 reference whose outputs this one is also compared with
    fields: dict = field(default_factory=dict)  # what names its rows: ``variant`` (and ``size``, ``precision``)

    def row(self, status: str, **more) -> dict:
        return {"variant": self.key, **self.fields, "status": status, **more}


class Results:
    """The rows so far, in plan order (skipped ones from the start), written after every variant."""

    def __init__(self, config: dict, steps: list[Step], reasons: dict, out: str, device: str):
        self.config, self.out, self.device = {**config, "plan": {s.key: reasons[s.key] or "run" for s in steps}}, out, device
        self.drift_from = {s.key: s.float32_reference for s in steps if s.float32_reference}
        self.slots = {s.key: [s.row("skipped", reason=reasons[s.key])] if reasons[s.key] else [] for s in steps}
        self.outputs = {}

    @property
    def rows(self) -> list[dict]:
        return [row for rows in self.slots.values() for row in rows]

    def add(self, key: str, rows: list[dict], outputs=None) -> None:
        self.slots[key] = rows
        if outputs is not None:
            self.outputs[key] = outputs
        self._drift()
        self.write()

    def _drift(self) -> None:
        from editreward_rt.tolerances import max_abs_diff

        for key, ref in self.drift_from.items():
            if key in self.outputs and ref in self.outputs and self.slots[key]:
                self.slots[key][0]["vs_float32_reference"] = {"reference": ref, "max_abs_diff": max_abs_diff(self.outputs[key], self.outputs[ref])}

    def write(self) -> Path:
        return write_document(results_document("latency", self.config, self.rows, self.device), self.out)


def parse_caps(values: list[str] | None, default: float) -> tuple[float, dict]:
    """``--cap-s 150 --cap-s torch-reference-float32=200``: a default and per-variant caps, in seconds."""
    caps = {}
    for value in values or []:
        key, sep, seconds = value.rpartition("=")
        if sep:
            caps[key] = float(seconds)
        else:
            default = float(seconds)
    return default, caps


def execute(steps: list[Step], reasons: dict, results: Results, run_step, budget_s: float, caps: tuple[float, dict]) -> int:
    """``run_step(step, reference_outputs, timeout_s, reader) -> (rows, outputs)`` for every planned
    step in order, while the budget lasts. -> exit code: 0, 1 (a variant failed) or 2 (a reference did)."""
    results.write()
    if all(reasons[s.key] for s in steps if s.is_reference):
        log("ABORT: no reference can run here (see the plan above); nothing could be judged")
        return EXIT_ABORTED
    reader, started, (default_cap, cap_of) = device_memory_reader(), time.monotonic(), caps
    for step in (s for s in steps if not reasons[s.key]):
        left = budget_s - (time.monotonic() - started)
        if left < MIN_START_S:
            results.add(step.key, [step.row("not-run", reason=f"budget spent ({budget_s:.0f} s)")])
            continue
        cap = min(cap_of.get(step.key, default_cap), left)
        log(f"== {step.key} (cap {cap:.0f} s)")
        rows, outputs = run_step(step, results.outputs, cap, reader)
        results.add(step.key, rows, outputs)
        if step.is_reference and rows[0]["status"] != "ok":
            log(f"ABORT: the reference {step.key} failed ({rows[0].get('error') or rows[0]['status']}); nothing after it can be judged")
            return EXIT_ABORTED
    return EXIT_FAILED if any(r["status"] in ("failed", "failed-parity") for r in results.rows) else 0


def log_plan(steps: list[Step], reasons: dict) -> None:
    """Say up front what will run and what is skipped, and why."""
    width = max((len(s.key) for s in steps), default=0)
    for s in steps:
        log(f"plan: {s.key:<{width}}  {'skipped: ' + reasons[s.key] if reasons[s.key] else 'runs'}")
