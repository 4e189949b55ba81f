"""The precision decision from a machine description (a table of machines), and on this machine for real:
ONEDNN_MAX_CPU_ISA=AVX2 set for a new process turns this CPU's native bf16 off, so it chooses fp32."""

import json

import pytest
from conftest import python

from horovod_mlstm import hardware

AMX_CPU = ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512_fp16", "avx512f", "fma"]
AVX512_BF16_CPU = ["avx2", "avx512_bf16", "avx512f", "fma"]  # e.g. AMD Zen 4, Intel Cooper Lake
AVX2_CPU = ["avx2", "fma"]


def machine(isa, gpus=(), max_isa="", onednn_opts=""):
    return {"cpu": "test", "isa": isa, "cores": 2, "gpus": list(gpus), "tensorflow": "2.15.1",
            "onednn": {"TF_ENABLE_ONEDNN_OPTS": onednn_opts, "ONEDNN_MAX_CPU_ISA": max_isa}}


V100 = {"name": "Tesla V100-SXM2-16GB", "compute_capability": "7.0"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}

DECISIONS = [
    # (machine, precision, words the reason must hold)
    (machine(AVX2_CPU, gpus=[V100]), "mixed_float16", "GPU"),
    (machine(AMX_CPU), "mixed_bfloat16", "natively (AMX)"),
    (machine(AVX512_BF16_CPU), "mixed_bfloat16", "natively (AVX512_BF16)"),
    (machine(AVX2_CPU), "fp32", "emulates bf16 (no AVX512_BF16/AMX)"),
    (machine(AMX_CPU, max_isa="AVX2"), "fp32", "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below the CPU's AMX/AVX512_BF16"),
    (machine(AMX_CPU, max_isa="avx512_core"), "fp32", "ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps oneDNN below"),
    (machine(AMX_CPU, max_isa="AVX2_VNNI_2"), "fp32", "ONEDNN_MAX_CPU_ISA=AVX2_VNNI_2"),  # not below AVX512_CORE either
    (machine(AMX_CPU, max_isa="AVX512_CORE_BF16"), "mixed_bfloat16", "natively (AVX512_BF16; ONEDNN_MAX_CPU_ISA"),
    (machine(AMX_CPU, max_isa="AVX512_CORE_AMX"), "mixed_bfloat16", "natively (AMX)"),
    (machine(AMX_CPU, max_isa="AVX10_1_512_AMX"), "mixed_bfloat16", "natively (AMX)"),
    (machine(AMX_CPU, max_isa="ALL"), "mixed_bfloat16", "natively (AMX)"),
    (machine(AVX512_BF16_CPU, max_isa="AVX512_CORE_VNNI"), "fp32", "keeps oneDNN below the CPU's AVX512_BF16"),
    (machine(AMX_CPU, onednn_opts="0"), "fp32", "oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0)"),
    (machine(None), "fp32", "instruction sets are unknown"),
]


@pytest.mark.unit
@pytest.mark.parametrize("description, precision, reason", DECISIONS)
def test_precision_decision(description, precision, reason):
    chosen, why = hardware.choose_precision(description)
    assert (chosen, why.startswith(f"{chosen}: "), reason in why) == (precision, True, True), why


@pytest.mark.unit
def test_emulated_names_what_is_not_native():
    assert hardware.emulated("fp32", machine(AVX2_CPU)) == ""
    assert hardware.emulated("mixed_bfloat16", machine(AMX_CPU)) == ""
    assert "no AVX512_BF16/AMX" in hardware.emulated("mixed_bfloat16", machine(AVX2_CPU))
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in hardware.emulated("mixed_bfloat16", machine(AMX_CPU, max_isa="AVX2"))
    assert "no GPU" in hardware.emulated("mixed_float16", machine(AMX_CPU))
    assert hardware.emulated("mixed_float16", machine(AVX2_CPU, gpus=[V100])) == ""
    assert "Tesla V100" in hardware.emulated("mixed_bfloat16", machine(AVX2_CPU, gpus=[V100]))
    assert hardware.emulated("mixed_bfloat16", machine(AVX2_CPU, gpus=[H100])) == ""


@pytest.mark.unit
def test_cpu_info_reads_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert hardware.cpu_info(str(cpuinfo)) == {"cpu": "Test CPU", "cpu_id": "cpu family 6 model 143",
                                               "isa": ["avx2", "avx512_bf16", "avx512f", "fma"]}
    assert hardware.cpu_info(str(tmp_path / "absent")) == {"cpu": "unknown", "cpu_id": "", "isa": None}


def this_machine(**env):
    proc = python("-m", "horovod_mlstm.hardware", env=env, check=True, timeout=300)
    return json.loads(proc.stdout)


@pytest.mark.cli
def test_a_cap_below_bf16_turns_this_machines_bf16_off():
    uncapped = this_machine(ONEDNN_MAX_CPU_ISA="")
    if uncapped["precision"] != "mixed_bfloat16":
        pytest.skip(f"this CPU does not compute bf16 natively ({uncapped['reason']})")
    capped = this_machine(ONEDNN_MAX_CPU_ISA="AVX2")
    assert capped["onednn"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert capped["precision"] == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in capped["reason"], capped["reason"]


@pytest.mark.unit
@pytest.mark.parametrize("isa, requested, precision, line", [
    (AMX_CPU, "auto", "mixed_bfloat16", "precision mixed_bfloat16 (--precision=auto: the CPU computes bf16 natively (AMX))"),
    (AVX2_CPU, "auto", "fp32", "precision fp32 (--precision=auto: this CPU emulates bf16"),
    (AVX2_CPU, "fp32", "fp32", "precision fp32 (as asked)"),
    (AMX_CPU, "mixed_bfloat16", "mixed_bfloat16", "precision mixed_bfloat16 (as asked)"),
    (AVX2_CPU, "mixed_bfloat16", "mixed_bfloat16",
     "warning: --precision=mixed_bfloat16 is emulated here (this CPU emulates bf16 (no AVX512_BF16/AMX), slower than "
     "fp32); --precision=auto would choose fp32"),
])
def test_resolve_makes_auto_concrete_and_warns_on_an_emulated_choice(monkeypatch, isa, requested, precision, line):
    monkeypatch.setattr(hardware, "describe", lambda: machine(isa))
    chosen, said = hardware.resolve(requested)
    assert chosen == precision and said.startswith(line), said


@pytest.mark.unit
def test_explicit_bf16_under_a_cap_below_avx512_is_refused(monkeypatch):
    """TensorFlow 2.15's bf16 matmul segfaults on an AVX-512 CPU whose oneDNN is capped below AVX512_CORE
    (measured on a Sapphire Rapids CPU with ONEDNN_MAX_CPU_ISA=AVX2): one line instead of a crash."""
    monkeypatch.setattr(hardware, "describe", lambda: machine(AMX_CPU, max_isa="AVX2"))
    with pytest.raises(ValueError, match="ONEDNN_MAX_CPU_ISA=AVX2 crashes TensorFlow's bf16 matmul"):
        hardware.resolve("mixed_bfloat16")
    assert hardware.resolve("auto")[0] == "fp32"
    monkeypatch.setattr(hardware, "describe", lambda: machine(AMX_CPU, max_isa="AVX512_CORE"))
    assert hardware.resolve("mixed_bfloat16")[0] == "mixed_bfloat16"  # emulated, warned about, runs
