"""What machine this is, and which precision suits it.

A 16-bit policy pays only where the hardware computes in 16 bits. A GPU's tensor cores do float16.
A CPU does bf16 natively only with AVX512_BF16 or AMX-BF16, and only if TensorFlow's oneDNN may use
them: ONEDNN_MAX_CPU_ISA caps the instruction sets oneDNN dispatches to, and TF_ENABLE_ONEDNN_OPTS=0
turns oneDNN off. Anywhere else bf16 is emulated, slower than fp32. So the choice is made from a
description of the machine:

    describe()                 -> the CPU, its ISA flags, cores, GPUs, TensorFlow and its oneDNN settings
    choose_precision(machine)  -> (precision, reason): a pure function of that description
    precision_for_this_process -> the same for the running process
    resolve(--precision)       -> auto made concrete, with the line a command logs about it
    emulated(precision, machine) -> why that precision is emulated here, or "" where it is native

    python -m horovod_mlstm.hardware    # prints the description and the choice
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

# The instruction sets that decide how fast a precision runs, as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
ONEDNN_SETTINGS = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA")

# oneDNN's ISA names and bit masks (dnnl_cpu_isa_t in oneDNN's dnnl_types.h, oneDNN 3.x). A cap
# allows an ISA when it holds all of that ISA's bits: the ISAs are only partly ordered (AVX2_VNNI_2
# is not below AVX512_CORE). AVX10_1_* are oneDNN 3.4's names for the same values.
ONEDNN_ISA_MASKS = {
    "SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F,
    "AVX512_CORE": 0x27, "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7,
    "AVX512_CORE_FP16": 0x1EF, "AVX10_1_512": 0x1EF,
    "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX": 0xFEF,
    "AVX512_CORE_AMX_FP16": 0x1FEF, "AVX10_1_512_AMX_FP16": 0x1FEF,
}
# The CPU's native bf16 paths, best first: (cpuinfo flag, its name in reasons, the oneDNN ISA it needs).
BF16_PATHS = (("amx_bf16", "AMX", "AVX512_CORE_AMX"), ("avx512_bf16", "AVX512_BF16", "AVX512_CORE_BF16"))
AUTO = "auto"  # --precision's default: choose_precision for this process
EMULATED_BF16 = "this CPU emulates bf16 (no AVX512_BF16/AMX), slower than fp32"


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's model name, family/model/stepping (the model name alone can be generic
    under a hypervisor) and the ISA_FLAGS it has, from cpuinfo; isa None where flags are unreadable."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, colon, value = line.partition(":")
                if colon:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags")
    return {"cpu": fields.get("model name", "unknown"),
            "cpu_id": " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields),
            "isa": None if flags is None else sorted(set(flags.split()) & set(ISA_FLAGS))}


def gpus() -> list[dict]:
    """The GPUs TensorFlow sees: name and compute capability, where TensorFlow reports them."""
    found = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        found.append({"name": details.get("device_name", device.name),
                      "compute_capability": ".".join(map(str, capability)) if capability else None})
    return found


def describe() -> dict:
    """This machine as the precision decision and the benchmark tables see it."""
    return {**cpu_info(), "cores": len(os.sched_getaffinity(0)), "gpus": gpus(),
            "tensorflow": tf.__version__, "onednn": {name: os.environ.get(name, "") for name in ONEDNN_SETTINGS}}


def onednn_cap(machine: dict) -> tuple[str, int | None]:
    """(ONEDNN_MAX_CPU_ISA as set, its mask); mask None when uncapped or not a name oneDNN knows
    (oneDNN then ignores it)."""
    cap = machine["onednn"].get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap, ONEDNN_ISA_MASKS.get(cap)


def native_bf16(machine: dict) -> tuple[str, str]:
    """(the bf16 path oneDNN may use here, e.g. "AMX", and what the cap blocks of a better one;
    or "" and why there is none)."""
    if machine["onednn"].get("TF_ENABLE_ONEDNN_OPTS", "").strip() == "0":
        return "", "oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0), so TensorFlow's own kernels emulate bf16"
    if machine["isa"] is None:
        return "", "this CPU's instruction sets are unknown (no flags in /proc/cpuinfo)"
    cap, mask = onednn_cap(machine)
    blocked = []
    for flag, name, needs in BF16_PATHS:
        if flag not in machine["isa"]:
            continue
        if mask is None or mask & ONEDNN_ISA_MASKS[needs] == ONEDNN_ISA_MASKS[needs]:
            return name, (f"; ONEDNN_MAX_CPU_ISA={cap} keeps it off {blocked[0]}" if blocked else "")
        blocked.append(name)
    if blocked:
        return "", (f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN below the CPU's {'/'.join(blocked)}, "
                    "so bf16 is emulated, slower than fp32")
    return "", EMULATED_BF16


def choose_precision(machine: dict) -> tuple[str, str]:
    """(precision, reason): mixed_float16 on a GPU, mixed_bfloat16 where the CPU computes bf16
    natively and oneDNN may use it, fp32 otherwise. The reason is one phrase for a log line."""
    if machine["gpus"]:
        return "mixed_float16", "mixed_float16: a GPU is visible (its tensor cores compute float16)"
    path, note = native_bf16(machine)
    if path:
        return "mixed_bfloat16", f"mixed_bfloat16: the CPU computes bf16 natively ({path}{note})"
    return "fp32", f"fp32: {note}"


def precision_for_this_process() -> tuple[str, str]:
    """choose_precision for the machine this process runs on."""
    return choose_precision(describe())


def resolve(requested: str) -> tuple[str, str]:
    """(the precision to run, one line about it): auto's choice here and why, or an explicit precision as
    asked, with a warning where this machine emulates it; ValueError for a choice that would crash."""
    if requested == AUTO:
        precision, reason = precision_for_this_process()
        return precision, f"precision {precision} (--precision=auto: {reason.split(': ', 1)[1]})"
    machine = describe()
    cap, mask = onednn_cap(machine)
    avx512 = ONEDNN_ISA_MASKS["AVX512_CORE"]
    if requested == "mixed_bfloat16" and "avx512f" in (machine["isa"] or ()) and mask is not None \
            and mask & avx512 != avx512:  # measured: TensorFlow 2.15's bf16 matmul then segfaults
        raise ValueError(f"--precision=mixed_bfloat16 under ONEDNN_MAX_CPU_ISA={cap} crashes TensorFlow's bf16 "
                         "matmul on this AVX-512 CPU (oneDNN capped below AVX512_CORE); use --precision=auto or "
                         "fp32, or raise the cap")
    slow = emulated(requested, machine)
    if slow:
        return requested, (f"warning: --precision={requested} is emulated here ({slow}); --precision=auto "
                           f"would choose {precision_for_this_process()[0]}")
    return requested, f"precision {requested} (as asked)"


def emulated(precision: str, machine: dict) -> str:
    """Why `precision` is emulated on this machine (slower than fp32), or "" where it is native."""
    if precision == "mixed_bfloat16":
        if machine["gpus"]:
            old = [g["name"] for g in machine["gpus"] if g["compute_capability"] and float(g["compute_capability"]) < 8]
            return f"{old[0]} has no bf16 tensor cores (compute capability below 8.0)" if old else ""
        path, why_not = native_bf16(machine)
        return "" if path else why_not
    if precision == "mixed_float16" and not machine["gpus"]:
        return "no GPU is visible, and TensorFlow's CPU kernels emulate float16"
    return ""


if __name__ == "__main__":
    description = describe()
    precision, reason = choose_precision(description)
    print(json.dumps({**description, "precision": precision, "reason": reason}, indent=2))
