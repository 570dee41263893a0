"""Static check: can TensorRT's ONNX parser take every node of our graphs?

The parser's published support matrix (onnx/onnx-tensorrt ``docs/operators.md``) is kept as
data, one file per TensorRT version, in ``data/trt_onnx_ops_<version>.json``: per operator,
whether it is supported, its supported data types, the restriction text, and the
restrictions we could state as machine-checkable rules. Each file records its source
(URL, commit where known) and the TensorRT version it describes.

``check_model`` walks every node (subgraphs included) with ONNX shape inference's types and
reports, per node: a non-standard domain (needs a plugin), an operator the parser lacks,
a data type outside the operator's list, a broken rule, or a tensor whose type could not be
inferred; plus graph-level problems (opset outside the parser's range, I/O types).
Restrictions that are only prose (e.g. "activation functions must be the same") are noted,
never silently passed: ``Report.notes`` lists the nodes they apply to.

``ops_from_markdown`` turns a copy of ``operators.md`` into such a data file, so a new
TensorRT release is one command away (see ``main``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from editreward_rt.manifest import MANIFEST

DATA = Path(__file__).parent / "data"
DEFAULT_VERSION = "10.15"  # newest published list stored; 10.0 is the oldest the [trt] extra allows
# The doc's type names -> ONNX TensorProto names.
DOC_TYPES = {"FP32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16", "DOUBLE": "DOUBLE", "INT32": "INT32",
             "INT64": "INT64", "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "INT4": "INT4",
             "FP8": "FLOAT8E4M3FN", "FP4": "FLOAT4E2M1"}
DOC_TYPE_ALIASES = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16",
                    "INF64": "INT64"}  # 'INF64' is a typo in the 10.1 table (ConstantOfShape)
FLOAT_TYPES = {"tensor(float)", "tensor(float16)", "tensor(bfloat16)"}
_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")

# Our encoding of the doc's restriction text: (phrase that must appear in the text, rule).
# A rule only enters a version's file when that version's text contains the phrase.
RULES: dict[str, list[tuple[str, dict]]] = {
    **{op: [("`dilations` must be empty or all ones", {"kind": "attr_all_ones", "attr": "dilations"})]
       for op in ("AveragePool", "LpPool")},
    "MaxPool": [("`dilations` must be empty or all ones", {"kind": "attr_all_ones", "attr": "dilations"}),
                ("`Indices` output tensor unsupported", {"kind": "max_outputs", "count": 1}),
                ("2D or 3D pooling only", {"kind": "input_rank", "input": 0, "ranks": [4, 5]})],
    "Attention": [("must be 4D", {"kind": "input_rank", "input": 0, "ranks": [4]}),
                  ("inputs are unsupported", {"kind": "input_absent", "inputs": [4, 5, 6]}),
                  ("outputs are unsupported", {"kind": "max_outputs", "count": 1}),
                  ("attributes are unsupported", {"kind": "attr_unset", "attrs": ["qk_matmul_output_mode", "softcap"]})],
    "Constant": [("attributes are unsupported", {"kind": "attr_unset", "attrs": ["sparse_value", "value_string", "value_strings"]})],
    "CumSum": [("`axis` must be", {"kind": "input_constant", "input": 1})],
    "DequantizeLinear": [("`x_zero_point` must be zero", {"kind": "input_zero", "input": 2})],
    "QuantizeLinear": [("`y_zero_point` must be 0", {"kind": "input_zero", "input": 2})],
    "Dropout": [("`is_training` must be an initializer", {"kind": "input_zero", "input": 2})],
    "EyeLike": [("must have static dimensions", {"kind": "input_static", "input": 0})],
    "GridSample": [("must be 4D", {"kind": "input_rank", "input": 0, "ranks": [4]})],
    "LayerNormalization": [("Only the first output", {"kind": "max_outputs", "count": 1})],
    "LSTM": [("`input_forget` attribute must be 0", {"kind": "attr_equals", "attr": "input_forget", "value": 0}),
             ("`layout` attribute must be 0", {"kind": "attr_equals", "attr": "layout", "value": 0})],
    "OneHot": [("`depth` must be", {"kind": "input_constant", "input": 1})],
    "Pad": [("`axes` must be an initializer", {"kind": "input_constant", "input": 3})],
    **{op: [("`axes` must be an initializer", {"kind": "input_constant", "input": 1})] for op in _REDUCE},
    "Resize": [("transformation modes", {"kind": "attr_in", "attr": "coordinate_transformation_mode",
                                         "values": ["half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"]}),
               ("Supported resize modes", {"kind": "attr_in", "attr": "mode", "values": ["nearest", "linear"]}),
               ("Supported nearest modes", {"kind": "attr_in", "attr": "nearest_mode",
                                            "values": ["floor", "ceil", "round_prefer_floor", "round_prefer_ceil"]}),
               ("aspect ratio policy", {"kind": "attr_in", "attr": "keep_aspect_ratio_policy", "values": ["stretch"]}),
               ("Antialiasing is not supported", {"kind": "attr_equals", "attr": "antialias", "value": 0})],
    "RotaryEmbedding": [("`position_ids` must be INT64", {"kind": "input_type", "input": 3, "types": ["INT64"]})],
    "STFT": [("must be an initializer", {"kind": "input_constant", "input": 1}),
             ("must be an initializer", {"kind": "input_constant", "input": 2})],
    "ScatterND": [("`reduction`", {"kind": "attr_in", "attr": "reduction", "values": ["none"]})],
    "Slice": [("`axes` must be an initializer", {"kind": "input_constant", "input": 3})],
    **{op: [("`axes` must be", {"kind": "input_constant", "input": 1})] for op in ("Squeeze", "Unsqueeze")},
    "TensorScatter": [("must be 4D", {"kind": "input_rank", "input": 0, "ranks": [4]}),
                      ("`axis` must be -2", {"kind": "attr_equals", "attr": "axis", "value": -2})],
    "TopK": [("`sorted` must be 1", {"kind": "attr_equals", "attr": "sorted", "value": 1}),
             ("`K` input must be less than", {"kind": "input_constant", "input": 1})],
}
# Restriction texts the rules above cover completely (otherwise the node is listed in notes).
FULLY_COVERED = {"AveragePool": False, "Constant": True, "CumSum": True, "DequantizeLinear": True, "QuantizeLinear": True,
                 "Dropout": True, "EyeLike": True, "GridSample": True, "LayerNormalization": True, "LpPool": True,
                 "MaxPool": True, "OneHot": True, "Pad": True, "Resize": False, "RotaryEmbedding": True, "STFT": False,
                 "ScatterND": True, "Slice": True, "Squeeze": True, "Unsqueeze": True, "TensorScatter": False,
                 "TopK": False, "Attention": False, "LSTM": False, **{op: True for op in _REDUCE}}
RULES_NOTE = ("'types', 'supported' and 'restrictions' are the document's; 'rules' are this project's machine-checkable "
              "reading of the restriction text (editreward_trt.ops.RULES); where 'rules_cover_restrictions' "
              "is false the checker lists the node as a note for a manual check")
# Ops whose type column describes particular inputs rather than the op's float type variable.
CHECKED_INPUTS = {"DequantizeLinear": [0], "QuantizeLinear": [0], "Attention": [0, 1, 2]}


def _doc_types(cell: str) -> list[str]:
    out = []
    for token in (t.upper() for t in re.split(r"[,\s]+", cell)):  # 10.0 writes 'INT64 BOOL' once
        token = DOC_TYPE_ALIASES.get(token, token)
        if token and token not in out:
            if token not in DOC_TYPES:
                raise ValueError(f"unknown type {token!r} in the support matrix")
            out.append(token)
    return out


def ops_from_markdown(text: str, source: dict) -> dict:
    """Parse ``docs/operators.md`` into the data-file layout (``source``: url, commit, ...)."""
    header = re.search(r"TensorRT ([0-9.]+) supports operators in the inclusive range of opset (\d+) to opset (\d+)", text)
    if not header:
        raise ValueError("no 'TensorRT X supports operators in the inclusive range of opset A to opset B' header")
    types_line = re.search(r"supports the following ONNX data types: ([^\n]+)", text)
    data_types = [DOC_TYPE_ALIASES.get(t, t) for t in re.findall(r"[A-Z0-9]+", types_line.group(1)) if t != "and"]
    operators = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue
        name, supported = cells[0], cells[1] == "Y"
        restriction = cells[3] if len(cells) > 3 else ""
        entry = {"supported": supported, "types": _doc_types(cells[2]) if supported and len(cells) > 2 else []}
        if restriction:
            entry["restrictions"] = restriction
            rules = [rule for phrase, rule in RULES.get(name, []) if phrase in restriction]
            if rules:
                entry["rules"] = rules
            entry["rules_cover_restrictions"] = bool(rules) and FULLY_COVERED.get(name, False)
        if name in CHECKED_INPUTS:
            entry["checked_inputs"] = CHECKED_INPUTS[name]
        operators[name] = entry
    return {"tensorrt_version": header.group(1), "source": source,
            "opset": {"min": int(header.group(2)), "max": int(header.group(3))},
            "data_types": [DOC_TYPE_ALIASES.get(t, t) for t in data_types],
            "io_only_types": ["UINT8"], "rules_note": RULES_NOTE, "operators": dict(sorted(operators.items()))}


def available_versions() -> list[str]:
    found = [p.stem.removeprefix("trt_onnx_ops_") for p in DATA.glob("trt_onnx_ops_*.json")]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def load_support(version: str = DEFAULT_VERSION) -> dict:
    path = DATA / f"trt_onnx_ops_{version}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no operator list for TensorRT {version}; stored: {available_versions()}")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Violation:
    graph: str
    node: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.op} node {self.node!r}: {self.problem}"


@dataclass
class Report:
    tensorrt_version: str
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nodes: int = 0


class _Graph:
    """Types, constants and shapes of one (sub)graph, with the enclosing graphs' as fallback."""

    def __init__(self, graph, outer: "_Graph | None" = None):
        self.types, self.shapes, self.consts = dict(outer.types) if outer else {}, dict(outer.shapes) if outer else {}, dict(outer.consts) if outer else {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.elem_type:
                self.types[vi.name] = t.elem_type
                if t.HasField("shape"):
                    self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for init in graph.initializer:
            self.types[init.name], self.shapes[init.name] = init.data_type, list(init.dims)
            self.consts[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = attr.t
                        self.types[node.output[0]] = attr.t.data_type


def _type_name(elem: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem)


def _allowed(entry: dict) -> set[str]:
    return {DOC_TYPES[t] for t in entry.get("types", [])}


def _checked_slots(schema, node, entry) -> list[tuple[str, str]]:
    """(tensor name, 'input i'/'output i') pairs whose type the support matrix constrains."""
    if "checked_inputs" in entry:
        return [(node.input[i], f"input {i}") for i in entry["checked_inputs"] if i < len(node.input) and node.input[i]]
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    data = {n for n, allowed in constraints.items() if allowed & FLOAT_TYPES} or set(constraints)

    def pick(formals, names, kind):
        out = []
        for i, name in enumerate(names):
            if not name or not formals:
                continue
            formal = formals[min(i, len(formals) - 1)]
            if formal.type_str in data:
                out.append((name, f"{kind} {i} ({formal.name})"))
        return out

    return pick(list(schema.inputs), node.input, "input") + pick(list(schema.outputs), node.output, "output")


def _attr(node, name):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _rule_problem(rule: dict, node, g: _Graph) -> str | None:
    kind = rule["kind"]
    value = _attr(node, rule.get("attr", ""))
    i = rule.get("input", 0)
    name = node.input[i] if i < len(node.input) else ""
    if isinstance(value, bytes):
        value = value.decode()
    if kind == "attr_all_ones":
        return None if value is None or all(v == 1 for v in value) else f"{rule['attr']}={value} (must be empty or all ones)"
    if kind == "attr_in":
        return None if value is None or value in rule["values"] else f"{rule['attr']}={value!r} (supported: {rule['values']})"
    if kind == "attr_equals":
        return None if value is None or value == rule["value"] else f"{rule['attr']}={value!r} (must be {rule['value']!r})"
    if kind == "attr_unset":
        present = [a for a in rule["attrs"] if _attr(node, a) not in (None, 0)]
        return f"attribute(s) {present} are unsupported" if present else None
    if kind == "max_outputs":
        used = [o for o in node.output if o]
        return f"{len(used)} outputs used; only the first {rule['count']} supported" if len(used) > rule["count"] else None
    if kind == "input_absent":
        used = [j for j in rule["inputs"] if j < len(node.input) and node.input[j]]
        return f"inputs {used} are unsupported" if used else None
    if not name:
        return None  # optional input left out: nothing to check
    if kind == "input_constant":
        return None if name in g.consts else f"input {i} ({name}) must be a build-time constant (initializer or Constant)"
    if kind == "input_zero":
        from onnx import numpy_helper

        if name not in g.consts:
            return f"input {i} ({name}) must be a constant zero"
        return None if not numpy_helper.to_array(g.consts[name]).any() else f"input {i} ({name}) must be zero"
    if kind == "input_type":
        t = g.types.get(name)
        allowed = {DOC_TYPES[x] for x in rule["types"]}
        return None if t and _type_name(t) in allowed else f"input {i} must be {rule['types']}, is {_type_name(t) if t else 'unknown'}"
    shape = g.shapes.get(name)
    if kind == "input_rank":
        return None if shape is None or len(shape) in rule["ranks"] else f"input {i} has rank {len(shape)}; supported {rule['ranks']}"
    if kind == "input_static":
        return None if shape is not None and None not in shape else f"input {i} must have static dimensions"
    raise ValueError(f"unknown rule kind {kind!r}")


def _check_graph(graph, label: str, support: dict, opset: int, report: Report, outer: _Graph | None = None) -> None:
    from onnx import defs

    g = _Graph(graph, outer)
    ops, allowed_all = support["operators"], set(support["data_types"])
    for node in graph.node:
        report.nodes += 1
        where = node.name or (node.output[0] if node.output else "?")
        bad = lambda problem: report.violations.append(Violation(label, where, node.op_type, problem))
        if node.domain not in ("", "ai.onnx"):
            bad(f"domain {node.domain!r} is not the ONNX standard domain; TensorRT would need a plugin")
            continue
        entry = ops.get(node.op_type)
        if entry is None or not entry["supported"]:
            bad(f"not supported by TensorRT {support['tensorrt_version']}'s ONNX parser" + ("" if entry else " (not in its list)"))
            continue
        try:
            schema = defs.get_schema(node.op_type, opset, "")
        except Exception:  # onnx raises SchemaError; any failure means we cannot map the type columns
            bad(f"no ONNX schema for {node.op_type} at opset {opset}")
            continue
        allowed, wrong = _allowed(entry), []
        for name, slot in _checked_slots(schema, node, entry):
            t = g.types.get(name)
            if t is None:
                bad(f"{slot} {name!r}: data type unknown (shape inference could not type it)")
            elif _type_name(t) not in allowed:
                wrong.append(f"{slot} is {_type_name(t)}")
        if wrong:
            bad(f"{', '.join(wrong)}; TensorRT {support['tensorrt_version']} supports {entry['types']}")
        for rule in entry.get("rules", []):
            problem = _rule_problem(rule, node, g)
            if problem:
                bad(problem)
        if entry.get("restrictions") and not entry.get("rules_cover_restrictions"):
            report.notes.append(f"{label}: {node.op_type} node {where!r}: check by hand: {entry['restrictions']}")
        for attr in node.attribute:  # If/Loop/Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_graph(sub, f"{label}/{where}.{attr.name}", support, opset, report, g)
    for vi in list(graph.input) + list(graph.output):
        if outer is None and vi.type.HasField("tensor_type"):
            name = _type_name(vi.type.tensor_type.elem_type)
            doc = {v: k for k, v in DOC_TYPES.items()}.get(name, name)
            if doc not in allowed_all:
                report.violations.append(Violation(label, vi.name, "graph I/O", f"type {name} is not a TensorRT type"))


def check_model(model_or_path, version: str = DEFAULT_VERSION, label: str | None = None, report: Report | None = None) -> Report:
    """Check one ONNX model (``ModelProto`` or path; external weights are not read)."""
    import onnx

    support = load_support(version)
    if not isinstance(model_or_path, onnx.ModelProto):
        label = label or Path(model_or_path).stem
        model_or_path = onnx.load(str(model_or_path), load_external_data=False)
    label = label or model_or_path.graph.name
    report = report or Report(support["tensorrt_version"])
    try:
        model = onnx.shape_inference.infer_shapes(model_or_path, strict_mode=False)
    except Exception as exc:  # onnx raises InferenceError and others; the types then stay unknown
        report.violations.append(Violation(label, "", "model", f"ONNX shape inference failed, types unchecked: {exc}"))
        model = model_or_path
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    lo, hi = support["opset"]["min"], support["opset"]["max"]
    if not lo <= opset <= hi:
        report.violations.append(Violation(label, "", "opset", f"opset {opset} outside TensorRT {support['tensorrt_version']}'s range {lo}..{hi}"))
    _check_graph(model.graph, label, support, opset, report)
    return report


def check_exported(folder, version: str = DEFAULT_VERSION, graphs=("vision", "decoder", "heads")) -> Report:
    """Check the TensorRT-bound graphs of an exported model folder (as its manifest names them)."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    report = Report(load_support(version)["tensorrt_version"])
    for name in graphs:
        check_model(folder / manifest["graphs"][name]["file"], version, label=name, report=report)
    return report


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="List ONNX nodes TensorRT's ONNX parser does not support.")
    parser.add_argument("path", nargs="?", help="exported model folder (manifest.json) or one .onnx file")
    parser.add_argument("--trt-version", default=DEFAULT_VERSION,
                        help=f"support list to check against, or 'all' (stored: {', '.join(available_versions())})")
    parser.add_argument("--notes", action="store_true", help="also list restrictions that need a manual check")
    parser.add_argument("--from-markdown", metavar="OPERATORS_MD", help="write a data file from a copy of docs/operators.md")
    parser.add_argument("--source-url", help="with --from-markdown: where the copy came from")
    parser.add_argument("--source-commit", help="with --from-markdown: the onnx-tensorrt commit it came from")
    args = parser.parse_args(argv)
    if args.from_markdown:
        source = {"url": args.source_url, "commit": args.source_commit, "file": "docs/operators.md"}
        data = ops_from_markdown(Path(args.from_markdown).read_text(encoding="utf-8"), source)
        out = DATA / f"trt_onnx_ops_{data['tensorrt_version']}.json"
        out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out} ({len(data['operators'])} operators)")
        return 0
    if not args.path:
        parser.error("give an exported model folder or an .onnx file")
    versions = available_versions() if args.trt_version == "all" else [args.trt_version]
    failed = False
    for version in versions:
        path = Path(args.path)
        report = check_exported(path, version) if path.is_dir() else check_model(path, version)
        for v in report.violations:
            print(f"[TensorRT {report.tensorrt_version}] {v}")
        if args.notes:
            for note in report.notes:
                print(f"[TensorRT {report.tensorrt_version}] note: {note}")
        status = "OK" if not report.violations else f"{len(report.violations)} violation(s)"
        print(f"TensorRT {report.tensorrt_version}: {report.nodes} nodes checked, {status}")
        failed |= bool(report.violations)
    return 1 if failed else 0
