"""The benchmark harness runs end to end on tiny sizes and writes well-formed results (no timing asserts),
and --paper measures the bytes of one update and refuses shapes over the memory limit."""

import json

import pytest
from conftest import last_line, python


@pytest.mark.cli
def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = python("-m", "horovod_mlstm.bench", "--quick", f"--output={out}", check=True, timeout=600)
    result = json.loads(out.read_text())
    assert {"limits", "project", "baseline", "scaling", "input", "ratios", "machine", "command"} <= set(result)
    assert {r["dtype"] for r in result["limits"]} == {"float32", "bfloat16"}
    for limit in result["limits"]:  # the chained limit, and the independent products' throughput beside it
        assert limit["flops_per_s"] > 0 and limit["independent_flops_per_s"] > 0 and 20 <= limit["matmuls"] <= 1000
        # read before and after the steps; the faster reading is the limit
        assert len(limit["readings"]) == 2 and limit["flops_per_s"] == max(limit["readings"])
    for row in result["project"] + result["baseline"]:
        assert row["chars_per_s"] > 0 and row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
    runs = {"gloo", "mpi", "gloo_cycle_1ms", "independent"}
    assert set(result["scaling"]["efficiency"]) == runs
    assert set(result["scaling"]["chars_per_s_per_worker"]) == {"1"} | {f"2_{r}" for r in runs}
    assert result["input"]["pipeline_bytes_per_s"] > 0 and result["input"]["preprocess_mb_per_s"] > 0
    # Both plain Keras baselines at both sequence lengths, each against the project's step at its shape.
    shapes = {(r["seq_length"], r["precision"]) for r in result["project"]}
    assert shapes == {(8, "fp32"), (16, "fp32"), (8, "mixed_bfloat16"), (16, "mixed_bfloat16")}
    assert {(r["variant"], r["seq_length"], r["precision"]) for r in result["baseline"]} == {
        (v, *shape) for v in ("weight_norm", "no_weight_norm") for shape in shapes}
    assert {"project_over_keras_no_weight_norm_32_seq8_fp32", "project_over_keras_weight_norm_32_seq16_fp32",
            "bf16_over_fp32_32_seq16"} <= set(result["ratios"])
    assert "[bench] wrote" in proc.stdout
    assert result["machine"]["gate_math"] == "fused CPU kernels"
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 32 | 4 x ")]  # docs/PERFORMANCE.md's
    assert len(table) == 4 and all(line.count("chars/s") == 3 for line in table), proc.stdout


@pytest.mark.cli
def test_bad_seq_lengths_is_one_line():
    proc = python("-m", "horovod_mlstm.bench", "--quick", "--seq_lengths=128,long")
    assert proc.returncode != 0 and last_line(proc.stderr) == "error: --seq_lengths must be integers, got 128,long"


@pytest.mark.cli
def test_unknown_precision_is_one_line():
    proc = python("-m", "horovod_mlstm.bench", "--quick", "--precisions=fp8")
    assert proc.returncode != 0 and "unknown precision 'fp8'" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- --paper: the paper's per-rank shape

TINY_PAPER = ["--paper", "--paper_hidden=64", "--paper_streams=4", "--paper_seq=32"]


@pytest.fixture(scope="module")
def paper_result(tmp_path_factory):
    """One tiny --paper run with a fit over 2, 4 and 8 streams: (its JSON, its stdout)."""
    out = tmp_path_factory.mktemp("paper") / "paper.json"
    proc = python("-m", "horovod_mlstm.bench", *TINY_PAPER, "--paper_fit_streams=2,8", f"--output={out}",
                  check=True, timeout=600)
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.cli
def test_paper_json_has_every_field(paper_result):
    result, stdout = paper_result
    assert {"memory", "activations", "computed_need", "parameters", "parameter_bytes", "optimizer_bytes",
            "allreduce_bytes", "checkpoint_bytes", "rnn_state_bytes_per_rank", "update_seconds", "runs", "fit",
            "capacity", "machine", "command"} <= set(result)
    memory = result["memory"]
    assert memory["max_rss_after_update"] >= memory["rss_model_built"] > 0
    assert memory["growth_in_update"] == memory["max_rss_after_update"] - memory["rss_model_built"]
    assert [r["streams"] for r in result["runs"]] == [2, 4, 8] and result["fit"]["streams"] == [2, 4, 8]
    growth = [r["memory"]["growth_in_update"] for r in result["runs"]]
    assert result["fit"]["slopes_between_runs"] == [(growth[1] - growth[0]) / 2, (growth[2] - growth[1]) / 4]
    assert result["update_seconds"] > 0
    assert result["optimizer_bytes"] >= 2 * result["parameter_bytes"]  # Adam's two moments
    assert result["checkpoint_bytes"] >= result["parameter_bytes"] + result["optimizer_bytes"]
    state = 2 * 4 * 4 * 64  # float32 [2, rows, hidden], plus the .npy header
    assert state < result["rnn_state_bytes_per_rank"] <= state + 256
    cap = result["capacity"]
    assert [row["micro_batches"] for row in cap["per_rank"]] == [1, 2, 4]  # 8 does not divide 4 streams
    assert [j["ranks"] for j in cap["jobs"]] == [1, 8, 128]
    assert cap["jobs"][2]["rnn_state_bytes"] == 128 * result["rnn_state_bytes_per_rank"]
    assert "PROJECTION (not measured)" in stdout and "| --backward_passes_per_step |" in stdout


@pytest.mark.cli
def test_paper_activation_memory_is_the_formula(paper_result):
    result, _ = paper_result
    cells, bf16, f32 = 4 * 32 * 64, 2, 4  # streams x seq x hidden
    expected = {"saved_by_forward": cells * (2 * bf16 + 6 * f32),  # x_m, hm; gates (4n), c_prev, tanh_c
                "read_by_backward": cells * (5 * bf16 + f32),  # proj [T, B, 5n], d_hs
                "kept_by_backward": cells * 5 * bf16,  # d_z (4n), d_m
                "stacked_by_backward": cells * 14 * bf16}  # the two stacked, d_xm, d_hm, m, h_prev, d_proj (5n)
    assert result["activations"] == {**expected, "total": cells * 80}
    assert result["computed_activation_bytes_per_stream"] == 32 * 64 * 80


@pytest.mark.cli
def test_paper_allreduce_is_four_bytes_per_parameter(paper_result):
    result, _ = paper_result
    n = result["parameters"]
    # hidden 64, embed 64: embedding, W_x, W_h, W_mx, W_mh, b, the four weight-norm gains, softmax
    assert n == 256 * 64 + 64 * 256 + 64 * 256 + 64 * 64 + 64 * 64 + 256 + 256 + 256 + 64 + 64 + 64 * 256 + 256
    assert result["parameter_bytes"] == 4 * n
    assert result["allreduce_bytes"] == {"fp32": 4 * n, "fp16_allreduce": 2 * n}


@pytest.mark.cli
def test_paper_micro_batches_split_the_activations(tmp_path):
    out = tmp_path / "paper.json"
    python("-m", "horovod_mlstm.bench", *TINY_PAPER, "--paper_micro_batches=2", "--paper_fit_streams=",
           f"--output={out}", check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["micro_batches"] == 2 and result["fit"] is None
    assert result["activations"]["total"] == 2 * 32 * 64 * 80  # one micro-batch of 2 streams


@pytest.mark.cli
def test_paper_refuses_a_shape_over_the_memory_limit_in_one_line(tmp_path):
    out = tmp_path / "paper.json"
    proc = python("-m", "horovod_mlstm.bench", "--paper", f"--output={out}", timeout=300)  # 4096 x 256 streams
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and not out.exists() and "[bench] paper shape" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: hidden 4096 with 256 streams x 256 bytes")
    assert "GiB (computed)" in lines[-1] and "lower --paper_streams" in lines[-1] and "--paper_force" in lines[-1]
    need = float(lines[-1].split("needs about ")[1].split(" GiB")[0])
    assert need > 8


@pytest.mark.cli
def test_paper_bad_micro_batches_is_one_line():
    proc = python("-m", "horovod_mlstm.bench", *TINY_PAPER, "--paper_micro_batches=3")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == ("error: --paper_micro_batches=3 must divide --paper_streams and every "
                                      "--paper_fit_streams")


@pytest.mark.cli
def test_paper_bad_fit_streams_is_one_line():
    proc = python("-m", "horovod_mlstm.bench", *TINY_PAPER, "--paper_fit_streams=8,x")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == "error: --paper_fit_streams='8,x' is not a list of stream counts like 8,16,32"


@pytest.mark.unit
def test_ring_allreduce_projection_formula():
    from horovod_mlstm.bench import allreduce_projection, ring_seconds

    assert ring_seconds(1e9, 2, 1e9) == pytest.approx(1.0)  # 2 ranks: each sends half twice
    p = allreduce_projection(128e6)
    assert p["flat_four_rings"] == pytest.approx(2 * 127 / 128 * 128e6 / 50e9)
    assert p["flat_one_ring"] == pytest.approx(4 * p["flat_four_rings"])
    assert p["hierarchical"] == pytest.approx(2 * 7 / 8 * 128e6 / 150e9 + 2 * 15 / 16 * 128e6 / 50e9)


@pytest.mark.cli
def test_profile_breaks_the_step_down_by_kind_of_op(tmp_path):
    out = tmp_path / "profile.json"
    proc = python("-m", "horovod_mlstm.bench", "--quick", "--profile", "--precisions=mixed_bfloat16",
                  f"--output={out}", check=True, timeout=600)
    profiles = json.loads(out.read_text())["profiles"]
    assert [(p["seq_length"], p["precision"]) for p in profiles] == [(8, "mixed_bfloat16"), (16, "mixed_bfloat16")]
    for p in profiles:
        kinds = p["kinds"]
        # The recurrence's matmuls, its bf16 <-> fp32 casts and its TensorArrays are all in the step.
        assert kinds["matmul"] > 0 and kinds["casts"] > 0 and kinds["TensorArray reads and writes"] > 0, kinds
        assert abs(sum(kinds.values()) - p["op_seconds_per_step"]) < 1e-9 and p["wall_seconds_per_step"] > 0
        assert sum(s for _, s in p["top_op_types"]) <= p["op_seconds_per_step"] + 1e-9
        # The unprofiled forward/backward split: the forward pass alone is part of the update.
        assert 0 < p["forward_seconds"] < p["update_seconds"] and p["backward_flops_per_s"] > 0
    assert proc.stdout.count("| kind of op | ms per step | share of op time |") == 2
    assert proc.stdout.count("unprofiled: update ") == 2


@pytest.mark.unit
def test_op_kinds():
    from horovod_mlstm.bench import op_kind

    assert [op_kind(t) for t in ("_MklMatMul", "_MklEinsum", "TensorListGetItem", "Cast", "Sigmoid", "_MklAddV2",
                                 "StridedSlice", "ResourceApplyAdam", "AssignAddVariableOp", "MlstmGatesGrad", "NoOp")] == [
        "matmul", "matmul", "TensorArray reads and writes", "casts", "elementwise and reductions",
        "elementwise and reductions", "slices, concats and copies", "optimizer and variables", "optimizer and variables",
        "fused gate kernels", "other"]
