"""What this machine can do at best: its CPU's instruction sets and the GEMM peaks onnxruntime reaches."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench.raw_limit import runs_per_second

# Square products big enough to reach the kernels' steady state, small enough to time in seconds.
GEMM_SIDE = 1024
# The flags that decide which matrix kernels onnxruntime's MLAS can pick.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    kernel_flags: list[str]
    fp32_peak_gflops: float  # GEMM, every core busy with its own single-thread session
    int8_peak_gops: float  # u8 x s8 -> s32 GEMM, the same way

    @property
    def has_vnni(self) -> bool:
        return any(flag in self.kernel_flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _cpuinfo() -> tuple[str, list[str]]:
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


def _gemm_graph(int8: bool) -> bytes:
    """A @ B with B a constant, as the model's linear layers are: float32, or uint8 x int8 -> int32."""
    rng = np.random.default_rng(0)
    side = GEMM_SIDE
    if int8:
        weights = rng.integers(-128, 128, (side, side), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        weights = rng.standard_normal((side, side), dtype=np.float32)
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("a", a_type, [side, side])],
        [helper.make_tensor_value_info("y", y_type, [side, side])],
        [numpy_helper.from_array(weights, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gemm_peak(int8: bool, cores: int, seconds: float) -> float:
    """Giga-operations per second (a multiply-add is two) over all cores."""
    rng = np.random.default_rng(1)
    shape = (GEMM_SIDE, GEMM_SIDE)
    a = rng.integers(0, 256, shape, dtype=np.uint8) if int8 else rng.standard_normal(shape, dtype=np.float32)
    runs = runs_per_second(_gemm_graph(int8), {"a": a}, sessions=cores, threads=1, seconds=seconds)
    return runs * 2 * GEMM_SIDE**3 / 1e9


def describe(cores: int, seconds: float) -> Machine:
    cpu, flags = _cpuinfo()
    return Machine(cpu, cores, flags, gemm_peak(False, cores, seconds), gemm_peak(True, cores, seconds))
