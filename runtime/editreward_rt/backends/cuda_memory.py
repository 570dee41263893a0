"""Device memory and streams for the TensorRT backend, through cuda-python.

Why cuda-python rather than torch: the TensorRT backend then needs only ``tensorrt`` and
``cuda-python`` (the ``[trt]`` extra, a few MB) instead of a 2+ GB PyTorch install, and
everything it does on the device is plain CUDA runtime calls: allocate, copy (including the
strided 2-D copies that gather key/value-cache rows), one stream, and CUDA graphs. The
pipeline above it works on numpy arrays anyway; only the key/value cache stays on the GPU.

Everything above the ``CudaMemory`` class is pure Python over an abstract memory object
(``malloc``/``free``/``copy_2d``), so the buffer pool and the cache gather are testable
with a host-memory fake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BackendError
from ..extras import require

CUDA_NOTE = "(cuda-python; tensorrt comes from NVIDIA's package index, https://pypi.nvidia.com)"


def bucket_bytes(n: int) -> int:
    """Allocation size for ``n`` bytes: 16 buckets per power of two (under 12.5% unused), 256-byte aligned."""
    n = max(int(n), 1)
    step = max(256, 1 << max(0, (n - 1).bit_length() - 4))
    return -(-n // step) * step


@dataclass
class DeviceBuffer:
    ptr: int
    capacity: int
    generation: int = 0  # bumped whenever the buffer is handed out to be overwritten


@dataclass(frozen=True)
class DeviceTensor:
    """A typed view of a pool buffer; valid until that buffer is handed out again."""

    buffer: DeviceBuffer
    shape: tuple[int, ...]
    itemsize: int
    generation: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def ptr(self) -> int:
        if self.generation != self.buffer.generation:
            raise BackendError("a key/value cache was used after its device buffer was reused (stale cache)")
        return self.buffer.ptr


class BufferPool:
    """One device buffer per key, grown to the next bucket when a larger shape arrives, else reused."""

    def __init__(self, mem):
        self.mem, self.buffers = mem, {}

    def get(self, key, nbytes: int) -> DeviceBuffer:
        buf = self.buffers.get(key)
        if buf is None or buf.capacity < nbytes:
            if buf is not None:
                self.mem.free(buf.ptr)
            size = bucket_bytes(nbytes)
            buf = DeviceBuffer(self.mem.malloc(size), size, buf.generation if buf else 0)
            self.buffers[key] = buf
        buf.generation += 1
        return buf

    def tensor(self, key, shape, itemsize: int) -> DeviceTensor:
        buf = self.get(key, math.prod(shape) * itemsize)
        return DeviceTensor(buf, tuple(int(s) for s in shape), itemsize, buf.generation)

    def other(self, keys: tuple, busy: DeviceBuffer | None):
        """Of two ping-pong keys, the one whose buffer is not ``busy`` (an input still to be read)."""
        first = self.buffers.get(keys[0])
        return keys[1] if first is not None and first is busy else keys[0]

    def total_bytes(self) -> int:
        return sum(b.capacity for b in self.buffers.values())

    def close(self) -> None:
        for buf in self.buffers.values():
            self.mem.free(buf.ptr)
        self.buffers.clear()


def _runs(rows) -> list[tuple[int, int, int]]:
    """(destination start, source start, length) runs of consecutive source rows."""
    out = []
    for j, r in enumerate(int(x) for x in rows):
        if out and out[-1][1] + out[-1][2] == r and out[-1][0] + out[-1][2] == j:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((j, r, 1))
    return out


def gather_batch(mem, src: DeviceTensor, rows, dst: DeviceTensor, axis: int) -> DeviceTensor:
    """``dst = np.take(src, rows, axis)`` (a cache's batch axis, from its ``CacheLayout``): one
    strided copy per run of consecutive rows."""
    lead, batch = math.prod(src.shape[:axis]), src.shape[axis]
    row = math.prod(src.shape[axis + 1:]) * src.itemsize
    assert dst.shape == src.shape[:axis] + (len(rows),) + src.shape[axis + 1:], (dst.shape, src.shape, len(rows))
    if row and len(rows):
        s, d = src.ptr, dst.ptr
        for j, r, n in _runs(rows):
            mem.copy_2d(d + j * row, len(rows) * row, s + r * row, batch * row, n * row, lead)
    return dst


def place_batch(mem, chunk: DeviceTensor, dst: DeviceTensor, offset: int, axis: int) -> None:
    """``dst[..., offset:offset+b, ...] = chunk`` along ``axis`` (a cache's batch axis)."""
    lead, b, total = math.prod(chunk.shape[:axis]), chunk.shape[axis], dst.shape[axis]
    row = math.prod(chunk.shape[axis + 1:]) * chunk.itemsize
    rest = lambda shape: shape[:axis] + shape[axis + 1:]
    assert rest(dst.shape) == rest(chunk.shape) and offset + b <= total
    if row and b:
        mem.copy_2d(dst.ptr + offset * row, total * row, chunk.ptr, b * row, b * row, lead)


# ---------------------------------------------------------------- CUDA runtime (cuda-python)


def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        runtime = require("cuda.cudart", "trt", "the tensorrt backend's device memory", CUDA_NOTE)  # older cuda-python
    return runtime


def _check(result):
    """cuda-python returns (error, *values); raise on error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        try:
            message = cudart().cudaGetErrorString(err)[1].decode()
        except Exception:  # the message is a courtesy; the error name is enough
            message = ""
        raise BackendError(f"CUDA error {getattr(err, 'name', err)}: {message}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_properties(device: int = 0) -> dict:
    """Name and compute capability of a GPU (what an engine is tied to)."""
    try:
        props = _check(cudart().cudaGetDeviceProperties(device))
        name, major, minor = props.name, props.major, props.minor
    except BackendError as missing:  # no cuda-python: torch, if present, knows the same
        try:
            import torch
        except ImportError:
            raise missing from None
        p = torch.cuda.get_device_properties(device)
        name, major, minor = p.name, p.major, p.minor
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode()
    return {"name": str(name).strip(), "compute_capability": [int(major), int(minor)]}


class CudaMemory:
    """The memory interface the pool and gathers use, on one device and one non-blocking stream."""

    def __init__(self, device: int = 0):
        self.rt = rt = cudart()
        _check(rt.cudaSetDevice(device))
        self.stream = _check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.handle = int(self.stream)

    def malloc(self, nbytes: int) -> int:
        return int(_check(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        _check(self.rt.cudaFree(ptr))

    def h2d(self, ptr: int, array) -> None:
        # From pageable memory the call returns once the source is staged, so ``array`` may go.
        _check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def d2h(self, array, ptr: int) -> None:
        _check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        _check(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream))

    def synchronize(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream))

    def capture(self, enqueue):
        """Record what ``enqueue()`` puts on the stream into an instantiated CUDA graph."""
        rt = self.rt
        _check(rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            enqueue()
        finally:
            graph = _check(rt.cudaStreamEndCapture(self.stream))
        try:
            return _check(rt.cudaGraphInstantiate(graph, 0))
        finally:
            _check(rt.cudaGraphDestroy(graph))

    def launch(self, graph_exec) -> None:
        _check(self.rt.cudaGraphLaunch(graph_exec, self.stream))

    def destroy_graph(self, graph_exec) -> None:
        _check(self.rt.cudaGraphExecDestroy(graph_exec))

    def close(self) -> None:
        _check(self.rt.cudaStreamDestroy(self.stream))
