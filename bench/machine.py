"""What this machine can do at best: its processor, and the GEMM peaks onnxruntime reaches on it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench.raw_limit import device_of, runs_per_second

# Square products big enough to reach the kernels' steady state, small enough to time in seconds.
GEMM_SIDE = {"cpu": 1024, "cuda": 8192}
# The flags that decide which matrix kernels onnxruntime's MLAS can pick.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
# The precisions whose peak is measured on each kind of device: those its variants run in.
PEAK_PRECISIONS = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "fp16")}
# (ONNX operator, input type, output type, numpy types of A and of B) per precision.
GEMM_TYPES = {
    "fp32": ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, np.float32, np.float32),
    "fp16": ("MatMul", TensorProto.FLOAT16, TensorProto.FLOAT16, np.float16, np.float16),
    # u8 activations x s8 weights: the pair VNNI multiplies.
    "int8": ("MatMulInteger", TensorProto.UINT8, TensorProto.INT32, np.uint8, np.int8),
}


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    kernel_flags: list[str]
    gpu: str | None  # the CUDA device the bench ran on; None on CPU
    peaks: dict[str, float]  # giga-operations/s of a GEMM in each precision, every core or the GPU busy
    python: str  # describe_python()

    @property
    def has_vnni(self) -> bool:
        return any(flag in self.kernel_flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))

    def peak_for(self, variant: str) -> float:
        return self.peaks[variant.split("+")[0]]


def cpu_info() -> tuple[str, list[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return name, [flag for flag in KERNEL_FLAGS if flag in flags]


def describe_cpu() -> str:
    """The processor's name and the flags that pick onnxruntime's matrix kernels."""
    name, flags = cpu_info()
    return f"{name} ({', '.join(flags) or 'no kernel flags of note'})"


def describe_python() -> str:
    """The interpreter every Python server in the bench runs on, and where it lives: its build moves
    their figures (a PGO build served the default model 6-11% faster than one without, mosec 4%)."""
    return f"{platform.python_implementation()} {platform.python_version()} ({os.path.realpath(sys.executable)})"


def describe_host(cores: int) -> str:
    """The processor, the cores the bench may use, and the interpreter."""
    return f"{describe_cpu()}, {cores} cores; {describe_python()}"


def gpu_name() -> str:
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        return query.stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "CUDA device (nvidia-smi did not name it)"


def _random_matrix(dtype: type, side: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, (side, side), dtype=dtype, endpoint=True)
    return rng.standard_normal((side, side), dtype=np.float32).astype(dtype)


def _gemm_graph(precision: str, side: int) -> bytes:
    """A @ B with B a constant, as the model's linear layers are."""
    op, a_type, y_type, _, weight_dtype = GEMM_TYPES[precision]
    weights = _random_matrix(weight_dtype, side, seed=0)
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", a_type, [side, side])],
        [helper.make_tensor_value_info("y", y_type, [side, side])],
        [numpy_helper.from_array(weights, "b")],
    )
    # IR 8 goes with opset 17; the onnx library's newest IR may be past what onnxruntime reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def gemm_peak(precision: str, cores: int, seconds: float, provider: str) -> float:
    """Giga-operations per second (a multiply-add is two): one single-thread session per core on
    CPU, one session with its input already on the device on CUDA."""
    device = device_of(provider)
    side = GEMM_SIDE[device]
    a = _random_matrix(GEMM_TYPES[precision][3], side, seed=1)
    sessions = 1 if device == "cuda" else cores
    runs = runs_per_second(_gemm_graph(precision, side), {"a": a}, sessions, 1, seconds, provider, device_input=True)
    return runs * 2 * side**3 / 1e9


def describe(cores: int, seconds: float, provider: str) -> Machine:
    cpu, flags = cpu_info()
    device = device_of(provider)
    peaks = {precision: gemm_peak(precision, cores, seconds, provider) for precision in PEAK_PRECISIONS[device]}
    return Machine(cpu, cores, flags, gpu_name() if device == "cuda" else None, peaks, describe_python())
