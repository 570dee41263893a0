"""The TensorRT Python API calls of the engine build (the only module here that imports tensorrt).

One engine per ONNX graph: ``OnnxParser`` into a network (strongly typed when the settings
say so), a builder config with the workspace limit, timing cache, precision flags, the
optimisation profiles from the manifest, fp32 pins for the named layers, and a progress
monitor; the serialized engine is written next to the graph.
"""

from __future__ import annotations

import time
from pathlib import Path

from editreward_rt.errors import ExportError
from editreward_rt.extras import require

TRT_NOTE = ("on a machine with an NVIDIA GPU; the tensorrt wheel downloads its libraries from NVIDIA's package "
            "index (https://pypi.nvidia.com), which must be reachable during the install. Everything before the "
            "engine build has been written")


def import_tensorrt():
    return require("tensorrt", "trt", "building TensorRT engines", TRT_NOTE, ExportError)


def gpu_info(device: int = 0) -> dict:
    from editreward_rt.backends.cuda_memory import gpu_properties

    return gpu_properties(device)


def _logger(trt):
    class Logger(trt.ILogger):
        """Prints warnings and errors as TensorRT reports them, and keeps the errors for the exception."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if level <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT {getattr(severity, 'name', level)}] {msg}", flush=True)

    return Logger()


def _progress(trt, log):
    """An IProgressMonitor printing top-level phases and every 10% of their steps (None before TensorRT 10)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Progress(base):
        def __init__(self):
            base.__init__(self)
            self.top, self.shown, self.started = {}, {}, {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.top[phase_name], self.shown[phase_name], self.started[phase_name] = num_steps, -1, time.perf_counter()
                log(f"  {phase_name}: {num_steps} steps")

        def step_complete(self, phase_name, step):
            total = self.top.get(phase_name)
            if total:
                tenth = (step + 1) * 10 // total
                if tenth > self.shown[phase_name]:
                    self.shown[phase_name] = tenth
                    log(f"  {phase_name}: {min(100, tenth * 10)}%")
            return True  # keep building

        def phase_finish(self, phase_name):
            if phase_name in self.top:
                log(f"  {phase_name}: done in {time.perf_counter() - self.started.pop(phase_name):.1f}s")

    return Progress()


def parser_errors(parser) -> list[str]:
    """Every error the ONNX parser recorded, with its node, as text."""
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            out.append(f"node {err.node()} {err.node_name()!r} ({err.node_operator()}): {err.desc()} [{err.code()}]")
        except AttributeError:  # older bindings expose only __str__
            out.append(str(err))
    return out


def node_outputs(onnx_path: Path, node_names: list[str]) -> list[str]:
    """The ONNX output tensor names of ``node_names`` (the parser names its tensors after them)."""
    import onnx

    wanted = set(node_names)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [o for n in graph.node if n.name in wanted for o in n.output]


def pin_fp32(trt, network, node_names: list[str], output_names: list[str]) -> int:
    """Constrain the layers the parser made for ``node_names`` to fp32 (inputs, math, outputs).

    onnx-tensorrt names a node's main layer after the node (a Gemm's MatrixMultiply) and leaves its
    helper layers unnamed (the Gemm's bias add), but the last of them produces the tensor named after
    the node's ONNX output: both are matched."""
    if not node_names:
        return 0
    names, outputs = set(node_names), set(output_names)
    pinned, matched = 0, set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        produced = {layer.get_output(j).name for j in range(layer.num_outputs)}
        if layer.name not in names and not produced & outputs:
            continue
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHUFFLE):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16, trt.bfloat16):
                layer.set_output_type(j, trt.float32)
        pinned += 1
        matched.add(layer.name)
    if not names <= matched:
        sample = [network.get_layer(i).name for i in range(min(network.num_layers, 8))]
        raise ExportError(f"no TensorRT layer named after ONNX nodes {sorted(names - matched)[:4]} "
                          f"(layer names look like {sample}); cannot keep them in fp32")
    return pinned


def _profiles(builder, config, profiles: list[dict]) -> None:
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, s in spec["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)


def build_engine(trt, onnx_path: Path, engine_path: Path, section: dict, fp32_nodes: list[str],
                 timing_cache: str | None, log=print) -> None:
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if section["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights are found beside it
        errors = parser_errors(parser) or logger.errors
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path} with {len(errors)} error(s):\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(section["workspace_gb"] * 2**30))
    settings = section["settings"]
    for flag in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in settings["cleared_flags"]:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    name = onnx_path.stem
    _profiles(builder, config, section["profiles"][name])
    if fp32_nodes:
        pinned = pin_fp32(trt, network, fp32_nodes, node_outputs(onnx_path, fp32_nodes))
        log(f"  {pinned} layers from {len(fp32_nodes)} ONNX nodes kept in fp32")
    monitor = _progress(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}:\n  " + "\n  ".join(logger.errors or ["(no error logged)"]))
    engine_path.write_bytes(memoryview(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    log(f"  wrote {engine_path.name} ({engine_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")
