"""The benchmark harness: its flags, formulas, fit and generated page in-process; end to end on tiny
sizes (no timing asserts); and the activation estimate held against the measured peak of real updates."""

import json

import pytest
from absl import flags
from conftest import last_line, python

from horovod_mlstm.bench import capacity, inference, projection, report
from horovod_mlstm.bench.__main__ import define_flags, inference_settings, paper_settings, step_settings
from horovod_mlstm.bench.figures import GIB
from horovod_mlstm.bench.profile import op_kind
from horovod_mlstm.inference import MIN_PIECE, encode
from horovod_mlstm.model import activation_bytes, flops_per_char

# ---------------------------------------------------------------- flags, formulas, tables (in-process)


def parsed(*args):
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["bench", *args])
    return fv


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["--seq_lengths=128,long"], "--seq_lengths must be integers, got 128,long"),
    (["--precisions=fp8"], "unknown precision 'fp8'; choose from ['fp32', 'mixed_bfloat16', 'mixed_float16']"),
    (["--hidden_sizes=256,big"], "--hidden_sizes must be integers, got 256,big"),
    (["--repeats=0"], "--hidden_sizes, --seq_lengths and --repeats must be positive"),
])
def test_step_flags_are_checked(args, message):
    with pytest.raises(ValueError) as error:
        step_settings(parsed(*args))
    assert str(error.value) == message


@pytest.mark.unit
def test_quick_flags_measure_tiny_sizes_once():
    settings = step_settings(parsed("--quick", "--hidden_sizes=4096", "--repeats=7"))
    assert (settings.hiddens, settings.repeats, settings.seq_lengths) == ([32], 1, [128, 256])


TINY_PAPER = ["--paper", "--paper_hidden=64", "--paper_streams=4", "--paper_seq=32"]


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["--paper_fit_streams=8,x"], "--paper_fit_streams='8,x' is not a list of stream counts like 8,16,32"),
    (["--paper_micro_batches=3"], "--paper_micro_batches=3 must divide --paper_streams and every --paper_fit_streams"),
    (["--paper_seq=0"], "--paper_hidden, --paper_streams, --paper_seq, --paper_micro_batches and --paper_fit_streams "
                        "must be positive"),
    (["--paper_memory_limit_gib=0"], "--paper_memory_limit_gib must be positive, got 0.0"),
])
def test_paper_flags_are_checked(args, message):
    with pytest.raises(ValueError) as error:
        paper_settings(parsed(*TINY_PAPER, *args))
    assert str(error.value) == message


@pytest.mark.unit
def test_paper_shapes_name_their_flags():
    settings = paper_settings(parsed(*TINY_PAPER, "--paper_fit_streams=2,8", "--paper_memory_limit_gib=1.5"))
    assert settings.shapes() == [("--paper_streams", 4), ("--paper_fit_streams", 2), ("--paper_fit_streams", 8)]
    assert settings.memory_limit_bytes == 1.5 * GIB


@pytest.mark.unit
def test_the_memory_limit_refuses_a_shape_before_any_work():
    with pytest.raises(ValueError) as error:
        capacity.check_memory([("--paper_fit_streams", 8), ("--paper_fit_streams", 2048)], 256, 256, "fp32", 1, 4 * GIB)
    assert str(error.value).startswith("hidden 256 with 2048 streams x 256 bytes (fp32) needs about ")
    assert str(error.value).endswith("GiB (estimated), over the --paper_memory_limit_gib=4 safety limit; lower "
                                     "--paper_fit_streams, or raise the limit (or pass --paper_force) where the "
                                     "memory is free")
    capacity.check_memory([("--paper_fit_streams", 8)], 256, 256, "fp32", 1, 4 * GIB)


@pytest.mark.unit
def test_activation_estimate_takes_the_larger_moment():
    bf16, fp32 = activation_bytes(1024, 2, 16, "mixed_bfloat16"), activation_bytes(1024, 2, 16, "fp32")
    for estimate in (bf16, fp32):
        assert estimate["total"] == max(estimate["forward_end"], estimate["reverse_loop_end"])
    assert fp32["total"] > bf16["total"]
    assert activation_bytes(1024, 4, 16, "fp32")["total"] == 2 * fp32["total"]  # linear in the streams


@pytest.mark.unit
def test_ring_allreduce_projection_formula():
    assert projection.ring_seconds(1e9, 2, 1e9) == pytest.approx(1.0)  # 2 ranks: each sends half twice
    p = projection.allreduce_projection(128e6)
    assert p["flat_four_rings"] == pytest.approx(2 * 127 / 128 * 128e6 / 50e9)
    assert p["flat_one_ring"] == pytest.approx(4 * p["flat_four_rings"])
    assert p["hierarchical"] == pytest.approx(2 * 7 / 8 * 128e6 / 150e9 + 2 * 15 / 16 * 128e6 / 50e9)


@pytest.mark.unit
def test_gpu_projection_formula():
    g = projection.gpu_projection(4096, 0.5)
    assert g["paper_chars_per_s_per_v100"] == pytest.approx(3 * 40e9 / (4 * 3600) / 128)
    assert g["flops_per_char"] == pytest.approx(3 * 2 * (64 * 5 * 4096 + 4096 ** 2 + 4 * 4096 ** 2 + 4096 * 256))
    assert g["v100_chars_per_s"] == pytest.approx(0.5 * 125e12 / g["flops_per_char"])
    assert g["h100_chars_per_s"] / g["v100_chars_per_s"] == pytest.approx(989 / 125)
    assert 0.2 < g["paper_share_of_v100_peak"] < 0.3
    above = projection.gpu_projection(4096, 1.33)  # the step above the CPU's chained limit: still no GPU above peak
    assert above["share_of_peak"] == 1.0 and above["v100_chars_per_s"] == pytest.approx(125e12 / g["flops_per_char"])


@pytest.mark.unit
def test_op_kinds():
    assert [op_kind(t) for t in ("_MklMatMul", "_MklEinsum", "TensorListGetItem", "Cast", "Sigmoid", "_MklAddV2",
                                 "StridedSlice", "ResourceApplyAdam", "AssignAddVariableOp", "MlstmGatesGrad", "NoOp")] == [
        "matmul", "matmul", "TensorArray reads and writes", "casts", "elementwise and reductions",
        "elementwise and reductions", "slices, concats and copies", "optimizer and variables", "optimizer and variables",
        "fused gate kernels", "other"]


@pytest.mark.unit
def test_featurising_flops_are_the_recurrent_matmuls_and_efficiency_is_their_rate_over_the_limit():
    n, e = 512, 64
    per_char = inference.featurising_flops_per_char(n)
    assert per_char == 2 * (n * n + 4 * n * n)  # h W_mh, m W_h; the input projection is looked up, no softmax
    assert per_char == flops_per_char(n, e, training=False) - 2 * n * 256 - 2 * e * 5 * n
    # Three passes of 100,000 chars, each with the limit read right after it: a slow pass that met a slow
    # limit reading is as efficient as a fast one that met a fast reading.
    rate = inference.efficiency(100_000, [10.0, 20.0, 8.0], per_char, [40e9, 20e9, 40e9])
    assert rate["flops_per_s"] == pytest.approx(10_000 * 2 * 1_310_720)  # the median pass, 10 s
    shares = sorted([10_000 * per_char / 40e9, 5_000 * per_char / 20e9, 12_500 * per_char / 40e9])
    assert rate["efficiency"] == pytest.approx(shares[1]) and shares[0] == pytest.approx(shares[1])
    assert rate["limit_flops_per_s"] == 40e9 and rate["limit_readings"] == [40e9, 20e9, 40e9]
    assert inference.compute_dtype("mixed_bfloat16") == "bfloat16" and inference.compute_dtype("fp32") == "float32"


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    ([], "--inference needs --inference_texts (a CSV or a file of one text per line)"),
    (["--inference_texts=t.txt", "--inference_batch_sizes=64,big"], "--inference_batch_sizes must be integers, "
                                                                    "got 64,big"),
    (["--inference_texts=t.txt", "--inference_chunks=0"], "--inference_chunks must be positive integers, got 0"),
    (["--inference_texts=t.txt", "--inference_max_texts=-1"], "--inference_max_texts must be 0 (all) or positive, "
                                                              "got -1"),
])
def test_inference_flags_are_checked(args, message):
    with pytest.raises(ValueError) as error:
        inference_settings(parsed("--inference", *args))
    assert str(error.value) == message


@pytest.mark.unit
def test_inference_reads_the_csv_column_or_the_lines_it_is_given(tmp_path):
    csv_file = tmp_path / "sst.csv"
    csv_file.write_text('label,sentence\n0,"Dull, dull."\n1,Fine.\n1,Great fun.\n')
    settings = inference_settings(parsed("--inference", f"--inference_texts={csv_file}", "--inference_max_texts=2",
                                         "--inference_batch_sizes=8,16", "--inference_window_batches=1,4"))
    assert settings.texts == ["Dull, dull.", "Fine."] and settings.model_dir == ""
    assert [(s.batch_size, s.window_batches) for s in settings.shapes] == [(8, 1), (8, 4), (16, 1), (16, 4)]
    with pytest.raises(ValueError, match="no column 'text'"):
        inference_settings(parsed("--inference", f"--inference_texts={csv_file}", "--inference_text_column=text"))
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        inference_settings(parsed("--inference", f"--inference_texts={csv_file}",
                                  f"--inference_model_dir={tmp_path}"))


def inference_run(**changes):
    """A run as inference.measure_model returns it, with made-up measurements."""
    run = {"hidden": 512, "precision": "mixed_bfloat16", "dtype": "bfloat16", "batch_size": 64, "chunk": 256,
           "window_batches": 16, "texts": 1821, "chars": 184_000, "positions": 200_000, "padding_share": 0.08,
           "seconds": {"median": 10.0, "min": 9.5, "max": 11.0}, "texts_per_s": 182.1, "chars_per_s": 18_400.0,
           "flops_per_char": 2_621_440.0, "flops_per_s": 54.3e9, "limit_flops_per_s": 120e9,
           "limit_readings": [118e9, 120e9, 125e9], "efficiency": 0.4525}
    return {**run, **changes}


@pytest.mark.unit
def test_inference_table_on_the_generated_page(tmp_path):
    result = {"command": "python -m horovod_mlstm.bench --inference", "machine": machine(),
              "inference": {"model_dir": "runs/imdb", "texts_file": "/data/sst/test.csv", "texts": 1821},
              "runs": [inference_run(), inference_run(batch_size=256, window_batches=1, efficiency=1.2)]}
    path = tmp_path / "inference.json"
    path.write_text(json.dumps(result))
    lines = report.document([str(path)]).splitlines()
    assert "## Featurisation rates: `inference.json`" in lines
    assert any(line.startswith("Featurising 1,821 texts of `test.csv` with the trained model(s)") for line in lines)
    assert "| 512 | mixed_bfloat16 | 64 | 256 | 16 | 182.1 | 18,400 | 8.0% | 54.3 GFLOP/s | 120.0 GFLOP/s | 45% |" in lines
    assert any(line.startswith("| 512 | mixed_bfloat16 | 256 | 256 | 1 |") and line.endswith("| 120% |")
               for line in lines)


def measured_run(streams, tensor_growth, hidden=64, seq=32, micro_batches=1):
    """A run as capacity.measure_update returns it, with made-up measurements."""
    parameters = 10_000
    return {"hidden": hidden, "streams": streams, "seq_length": seq, "precision": "mixed_bfloat16",
            "micro_batches": micro_batches, "update_seconds": 1.0, "chars_per_s": streams * seq,
            "memory": {"max_rss_after_update": 3 * GIB, "rss_model_built": 2 * GIB, "growth_in_update": GIB,
                       "tensor_growth_in_update": tensor_growth},
            "parameters": parameters, "parameter_bytes": 4 * parameters, "optimizer_bytes": 8 * parameters,
            "allreduce_bytes": {"fp32": 4 * parameters, "fp16_allreduce": 2 * parameters},
            "checkpoint_bytes": 12 * parameters + 1000, "rnn_state_bytes_per_rank": 2 * 4 * streams * hidden + 128}


@pytest.mark.unit
def test_fit_and_capacity_from_runs():
    runs = {2: measured_run(2, 1_000), 4: measured_run(4, 3_000), 8: measured_run(8, 7_000)}
    result = capacity.summarize(runs, 4)
    assert result["fit"]["slope_bytes_per_stream"] == pytest.approx(1_000)
    assert result["fit"]["intercept_bytes"] == pytest.approx(-1_000)
    assert result["fit"]["slopes_between_runs"] == [1_000, 1_000]
    cap = result["capacity"]
    assert [row["micro_batches"] for row in cap["per_rank"]] == [1, 2, 4]  # 8 does not divide 4 streams
    assert all(all(row["fits"].values()) for row in cap["per_rank"])
    assert [j["ranks"] for j in cap["jobs"]] == [1, 8, 128]
    assert cap["jobs"][2]["rnn_state_bytes"] == 128 * result["rnn_state_bytes_per_rank"]
    assert cap["jobs"][1]["allreduce_bytes_per_rank"]["fp32"] == pytest.approx(2 * 7 / 8 * 40_000)


def machine(isa=("amx_bf16", "avx512_bf16")):
    return {"cpu": "Test CPU", "cpu_id": "", "isa": list(isa), "cores": 2, "gpus": [], "tensorflow": "2.15.1",
            "onednn": {"TF_ENABLE_ONEDNN_OPTS": "", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "threads": 2,
            "gate_math": "fused CPU kernels", "python": "3.11",
            "precision_choice": {"precision": "fp32", "reason": "fp32: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below"}}


@pytest.mark.unit
def test_generated_page_names_the_machine_of_each_figure(tmp_path):
    paper = capacity.summarize({2: measured_run(2, 1_000), 4: measured_run(4, 3_000)}, 4)
    paper.update(command="bench --paper", machine=machine())
    path = tmp_path / "paper.json"
    path.write_text(json.dumps(paper))
    page = report.document([str(path)])
    assert "## The paper's per-rank shape: `paper.json`" in page
    assert "- CPU: Test CPU, 2 cores usable" in page and "ONEDNN_MAX_CPU_ISA=AVX2" in page
    assert "bf16 figures: **emulated here**" in page  # the cap keeps this CPU's AMX from oneDNN
    assert "PROJECTION (not measured)" in page and "| --backward_passes_per_step |" in page
    assert "NVIDIA DGX-1 datasheet" in page  # the published figures, with their sources
    (tmp_path / "old.json").write_text(json.dumps({"machine": {"cpu": "x"}, "memory": {}}))
    with pytest.raises(ValueError, match="old.json: not a result of this benchmark"):
        report.document([str(tmp_path / "old.json")])


@pytest.mark.unit
def test_generated_step_section_projects_from_a_large_bf16_step():
    step = {"hidden": 1024, "batch": 64, "seq_length": 256, "chars_per_s": 7000.0, "flops_per_s": 245e9,
            "fraction_of_matmul_limit": 0.9}
    result = {"command": "python -m horovod_mlstm.bench", "machine": machine(("avx2", "fma")),
              "limits": [{"hidden": 1024, "dtype": d, "flops_per_s": 270e9} for d in ("float32", "bfloat16")],
              "project": [{**step, "precision": "mixed_bfloat16"}, {**step, "precision": "fp32"}],
              "baseline": [{**step, "precision": "mixed_bfloat16", "variant": "no_weight_norm", "chars_per_s": 5000.0}]}
    lines = "\n".join(report.section("bench.json", result)).splitlines()
    assert "| 1024 | 64 x 256 | mixed_bfloat16 | 270 GFLOP/s | 7,000 chars/s = 245 GFLOP/s | 90% | not run | | " \
           "5,000 chars/s | 1.40x |" in lines
    v100 = projection.gpu_projection(4096, 0.9)["v100_chars_per_s"]
    assert any(line.startswith(f"| V100 (125 TFLOP/s fp16) | {v100:,.0f} | projection |") for line in lines)
    assert any("bf16 figures: **emulated here**" in line for line in lines)  # an AVX2 CPU


# ---------------------------------------------------------------- end to end, one process each


@pytest.mark.cli
def test_quick_bench_writes_every_section_and_the_page(tmp_path):
    out = tmp_path / "bench.json"
    proc = python("-m", "horovod_mlstm.bench", "--quick", f"--output={out}", check=True, timeout=1500)
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
    machine_ = result["machine"]
    assert machine_["gate_math"] == "fused CPU kernels" and machine_["cpu"] and machine_["cores"] >= 1
    assert machine_["precision_choice"]["reason"].startswith(machine_["precision_choice"]["precision"] + ": ")
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 32 | 4 x ")]
    assert len(table) == 4 and all(line.count("chars/s") == 3 for line in table), proc.stdout
    page = report.document([str(out)])
    assert f"- CPU: {machine_['cpu']}" in page and machine_["precision_choice"]["reason"] in page
    assert sum(line.startswith("| 32 | 4 x ") for line in page.splitlines()) == 4
    assert "No GPU projection: this run measured no bf16 step at hidden 1024" in page and "| 1 process |" in page
    assert result["command"] == f"python -m horovod_mlstm.bench --quick --output={out}"


@pytest.mark.cli
def test_report_cli_writes_the_page_whole_or_says_why_not(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    page = tmp_path / "page.md"
    proc = python("-m", "horovod_mlstm.bench.report", str(bad), f"--output={page}")
    assert proc.returncode != 0 and last_line(proc.stderr).startswith(f"error: {bad}: cannot read it as JSON")
    assert not page.exists() and "Traceback" not in proc.stderr


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
        # The unprofiled forward/backward split, from two medians; at this tiny shape noise can exceed the
        # backward pass, which the report then says rather than print a negative rate.
        assert p["forward_seconds"] > 0 and p["update_seconds"] > 0
        backward = p["update_seconds"] - p["forward_seconds"]
        assert p["backward_flops_per_s"] is None if backward <= 0 else p["backward_flops_per_s"] > 0
    assert proc.stdout.count("| kind of op | ms per step | share of op time |") == 2
    assert proc.stdout.count("unprofiled: update ") == 2


@pytest.mark.cli
def test_paper_refuses_a_shape_over_the_memory_limit_in_one_line(tmp_path):
    out = tmp_path / "paper.json"
    proc = python("-m", "horovod_mlstm.bench", "--paper", f"--output={out}", timeout=300)  # 4096 x 256 streams
    assert proc.returncode != 0 and not out.exists() and "[bench] paper shape" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("error: hidden 4096 with 256 streams x 256 bytes")
    need = float(last_line(proc.stderr).split("needs about ")[1].split(" GiB")[0])
    assert 8 < need < 24  # about 14 GiB: 11 of activations, 2.6 of weights, Adam and the working set


@pytest.mark.cli
def test_inference_measures_a_tiny_random_model_against_the_limit(tmp_path):
    texts = [f"review {i}: " + "good " * (i % 7) + "bad " * (i % 3) for i in range(60)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    texts = texts[:50]  # --inference_max_texts
    out = tmp_path / "inference.json"
    proc = python("-m", "horovod_mlstm.bench", "--inference", f"--inference_texts={source}", "--inference_max_texts=50",
                  "--hidden_sizes=16", "--precisions=fp32", "--inference_batch_sizes=8,16",
                  "--inference_window_batches=1,4", "--repeats=1", f"--output={out}", check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["inference"] == {"model_dir": "random", "texts_file": str(source), "texts": 50}
    assert result["machine"]["cpu"] and result["command"].startswith("python -m horovod_mlstm.bench --inference")
    runs = result["runs"]
    assert [(r["batch_size"], r["window_batches"]) for r in runs] == [(8, 1), (8, 4), (16, 1), (16, 4)]
    chars = sum(len(encode(t)) for t in texts)
    for r in runs:
        assert (r["hidden"], r["precision"], r["chunk"], r["texts"], r["chars"]) == (16, "fp32", 256, 50, chars)
        assert r["positions"] >= chars and r["padding_share"] == pytest.approx(1 - chars / r["positions"])
        assert r["chars_per_s"] == pytest.approx(chars / r["seconds"]["median"])
        assert r["texts_per_s"] == pytest.approx(50 / r["seconds"]["median"])
        assert r["flops_per_s"] == pytest.approx(r["chars_per_s"] * inference.featurising_flops_per_char(16))
        assert r["dtype"] == "float32" and len(r["limit_readings"]) == 1  # one pass (--repeats=1), the limit read after it
        assert r["limit_flops_per_s"] == r["limit_readings"][0] > 0
        assert r["efficiency"] == pytest.approx(r["flops_per_s"] / r["limit_flops_per_s"])
        # Each text pads only in its last piece, and fewer than MIN_PIECE positions there (inference.Featurizer).
        assert r["positions"] - chars <= 50 * (MIN_PIECE - 1)
    assert sum(line.startswith("| 16 | fp32 | ") for line in proc.stdout.splitlines()) == 4
    page = report.document([str(out)])
    assert "## Featurisation rates" in page and "randomly initialised model(s)" in page


# ---------------------------------------------------------------- --paper: real updates, each in a fresh process

# Large enough that the activations decide the update's peak (not the parameter-sized phase), small
# enough for seconds per update.
ESTIMATE_SHAPE = ["--paper", "--paper_hidden=512", "--paper_streams=16", "--paper_seq=128", "--paper_fit_streams=48"]
# The measured growth per stream lay within 1.00-1.10x of the estimate at hidden 256-1024 in both
# precisions (docs/CAPACITY.md); keeping one more [T, B, 4n] float32 tensor would add 16 bytes per
# cell to the estimate's 46 (bf16) or 64 (fp32), and fail.
TOLERANCE = 0.2


@pytest.fixture(scope="module", params=["mixed_bfloat16", "fp32"])
def paper_result(request, tmp_path_factory):
    """One --paper run at ESTIMATE_SHAPE in the given precision: 16 and 48 streams, each in a fresh process."""
    out = tmp_path_factory.mktemp("paper") / "paper.json"
    proc = python("-m", "horovod_mlstm.bench", *ESTIMATE_SHAPE, f"--paper_precision={request.param}",
                  f"--output={out}", check=True, timeout=900)
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.cli
def test_activation_estimate_holds_against_the_measured_peak(paper_result):
    result, _ = paper_result
    measured = result["fit"]["slope_bytes_per_stream"]  # tensor bytes the update's peak grows by per stream
    estimate = result["computed_activation_bytes_per_stream"]
    assert abs(measured / estimate - 1) <= TOLERANCE, (measured, estimate, result["precision"])


@pytest.mark.cli
def test_paper_json_has_every_field(paper_result):
    result, stdout = paper_result
    assert {"memory", "activations", "computed_need", "parameters", "parameter_bytes", "optimizer_bytes",
            "allreduce_bytes", "checkpoint_bytes", "rnn_state_bytes_per_rank", "update_seconds", "runs", "fit",
            "capacity", "machine", "command"} <= set(result)
    memory = result["memory"]
    assert memory["max_rss_after_update"] >= memory["rss_model_built"] > 0
    assert memory["growth_in_update"] == memory["max_rss_after_update"] - memory["rss_model_built"]
    assert memory["tensor_growth_in_update"] > 0 and memory["tensor_bytes_model_built"] > 0
    assert [r["streams"] for r in result["runs"]] == [16, 48] and result["fit"]["streams"] == [16, 48]
    assert result["update_seconds"] > 0
    assert result["optimizer_bytes"] >= 2 * result["parameter_bytes"]  # Adam's two moments
    assert result["checkpoint_bytes"] >= result["parameter_bytes"] + result["optimizer_bytes"]
    state = 2 * 16 * 512 * 4  # float32 [2, rows, hidden], plus the .npy header
    assert state < result["rnn_state_bytes_per_rank"] <= state + 256
    assert "PROJECTION (not measured)" in stdout and "| --backward_passes_per_step |" in stdout


@pytest.mark.cli
def test_paper_allreduce_is_four_bytes_per_parameter(paper_result):
    result, _ = paper_result
    n, e = 512, 64
    # embedding, W_x, W_h, W_mx, W_mh, b, the four weight-norm gains, softmax kernel and bias
    assert result["parameters"] == (256 * e + e * 4 * n + n * 4 * n + e * n + n * n + 4 * n
                                    + 4 * n + 4 * n + n + n + n * 256 + 256)
    assert result["parameter_bytes"] == 4 * result["parameters"]
    assert result["allreduce_bytes"] == {"fp32": 4 * result["parameters"], "fp16_allreduce": 2 * result["parameters"]}


@pytest.mark.cli
def test_paper_micro_batches_split_the_activations(tmp_path):
    out = tmp_path / "paper.json"
    python("-m", "horovod_mlstm.bench", *TINY_PAPER, "--paper_micro_batches=2", "--paper_fit_streams=",
           f"--output={out}", check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["micro_batches"] == 2 and result["fit"] is None
    assert result["activations"] == activation_bytes(64, 2, 32, "mixed_bfloat16")  # one micro-batch of 2 streams
