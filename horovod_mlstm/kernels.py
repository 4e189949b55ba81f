"""Fused CPU kernels for the mLSTM's per-step gate math (kernels.cc), and their build.

Each recurrent step is a strict chain: a matmul, the gate math (about a dozen elementwise ops on
[batch, hidden] tensors), the next matmul. TensorFlow runs each elementwise op as its own kernel;
kernels.cc does a step's gate math in one kernel and its gradient in another, which made the update
1.07-1.10x faster in bf16 on CPU, 1.01-1.05x in fp32 (docs/PERFORMANCE.md); a third does a featurising
step's gate math with the running sum and maximum of the hidden states (model.MLSTM.read). The model uses them where this module finds the
library built from the current kernels.cc for this TensorFlow and no GPU is visible, and TensorFlow's
own ops otherwise (GPU, XLA, or not built). `make setup` builds them; by hand:

    python -m horovod_mlstm.kernels
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys

import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cc")
# -march=native: built by each machine for its own CPU (make setup), like Horovod itself.
CXXFLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
# Where -march=native turns on AVX512-FP16 (Sapphire Rapids and later), the Eigen headers of TensorFlow
# 2.15 fail to compile their float16 packet casts ("invalid static_cast ... to __vector(16) float");
# TensorFlow itself is built without it, so the kernels leave it off too.
NO_FP16_VECTORS = "-mno-avx512fp16"


def _cpu() -> bytes:
    """This CPU's model and instruction sets: a checkout shared by several kinds of node keeps one
    library per kind, and none loads a library built for another CPU (it could die of SIGILL)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
    except OSError:
        return b""
    return "".join(sorted(set(lines))).encode()


for _op in ("MlstmGates", "MlstmGatesGrad", "MlstmRead"):
    tf.no_gradient(_op)  # used inside the model's custom gradient, or where nothing is differentiated


def library_path() -> str:
    """Where the library built from this kernels.cc, for this TensorFlow, flags and CPU, lives."""
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + tf.__version__.encode() + " ".join(CXXFLAGS).encode() + _cpu()).hexdigest()[:12]
    return os.path.join(os.path.dirname(SOURCE), f"_kernels-{key}.so")


def build() -> str:
    """Compiles kernels.cc (about 10 s) unless the library for it is already there; returns its path."""
    path = library_path()
    if os.path.exists(path):
        return path
    tmp = f"{path}.{os.getpid()}.tmp"
    extra = [NO_FP16_VECTORS] if b"avx512_fp16" in _cpu() else []
    cmd = [os.environ.get("CXX", "g++"), *CXXFLAGS, *extra, SOURCE, "-o", tmp, *tf.sysconfig.get_compile_flags(),
           *tf.sysconfig.get_link_flags()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if extra and "unrecognized command-line option" in proc.stderr:  # a compiler older than the CPU
            proc = subprocess.run([c for c in cmd if c not in extra], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"no C++ compiler {cmd[0]!r} (apt-get install g++, or set CXX)") from None
    if proc.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        first_error = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[-300:])
        raise RuntimeError(f"compiling {SOURCE} failed: {first_error}")
    os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same file
    _load.cache_clear()
    return path


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str]:
    """(the loaded op library or None, why not)."""
    if tf.config.list_physical_devices("GPU"):
        return None, "a GPU is visible (the kernels are CPU-only)"
    path = library_path()
    if not os.path.exists(path):
        return None, "not built for this kernels.cc, TensorFlow and CPU; make setup builds them"
    return tf.load_op_library(path), ""


def available() -> bool:
    return _load()[0] is not None


def status() -> str:
    """One phrase for logs and benchmark records: which gate math the model runs."""
    library, why_not = _load()
    return "fused CPU kernels" if library is not None else f"TensorFlow ops ({why_not})"


def gates(xz, mz, c):
    """One step's gate math: (saved [B, 6n], c_new, h) in float32 and h in xz's dtype (model._gates)."""
    return _load()[0].mlstm_gates(xz, mz, c)


def gates_grad(d_h, d_hs, d_c, saved):
    """Gradient through one step's gate math: (d_z [B, 4n] in d_h's dtype, d_c for step t-1)."""
    return _load()[0].mlstm_gates_grad(d_h, d_hs, d_c, saved)


def read(table, ids, mz, c, h, total, peak, lengths, t):
    """One featurising step (model._read_gates), each row's input projections the row ids[b] of TABLE:
    (c, h, h in mz's dtype, total, peak), rows with t >= lengths unchanged."""
    return _load()[0].mlstm_read(table, ids, mz, c, h, total, peak, lengths, t)


def main() -> None:
    try:
        print(f"[kernels] {build()}")
    except RuntimeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
