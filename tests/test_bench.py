"""The benchmark harness runs end to end on tiny sizes and writes well-formed results (no timing asserts)."""

import json

from conftest import python


def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = python("-m", "horovod_mlstm.bench", "--quick", f"--output={out}", check=True, timeout=600)
    result = json.loads(out.read_text())
    assert {"limits", "project", "baseline", "scaling", "input", "ratios", "machine", "command"} <= set(result)
    assert {r["dtype"] for r in result["limits"]} == {"float32", "bfloat16"}
    for row in result["project"] + result["baseline"]:
        assert row["chars_per_s"] > 0 and row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
    runs = {"gloo", "mpi", "gloo_cycle_1ms", "independent"}
    assert set(result["scaling"]["efficiency"]) == runs
    assert set(result["scaling"]["chars_per_s_per_worker"]) == {"1"} | {f"2_{r}" for r in runs}
    assert result["input"]["pipeline_bytes_per_s"] > 0 and result["input"]["preprocess_mb_per_s"] > 0
    assert "project_over_keras_32_fp32" in result["ratios"]
    assert "[bench] wrote" in proc.stdout
    assert "| 32 | 4 x 16 | fp32 |" in proc.stdout  # the Markdown table of docs/PERFORMANCE.md


def test_unknown_precision_is_one_line():
    proc = python("-m", "horovod_mlstm.bench", "--quick", "--precisions=fp8")
    assert proc.returncode != 0 and "unknown precision 'fp8'" in proc.stderr.strip().splitlines()[-1]
