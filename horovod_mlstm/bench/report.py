"""The benchmark's results as Markdown: the tables each job prints, and the generated reference page.

    python -m horovod_mlstm.bench.report docs/benchmarks/*.json --output docs/benchmarks.md

reads benchmark JSON files (the step benchmark, --profile, --paper, --inference) and writes one page that names,
above each table, the CPU, cores, oneDNN settings and precision choice of the machine the figures
came from, and which figures hold only on some CPUs. A new run edits that one generated file
(`make bench-docs`); the hand-written docs explain the figures and link to it.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from horovod_mlstm import files, hardware
from horovod_mlstm.bench import figures, projection
from horovod_mlstm.bench.baselines import BASELINES
from horovod_mlstm.bench.figures import DEVICE_MEMORY, GIB
from horovod_mlstm.model import activation_bytes

FLAGS = flags.FLAGS


def gib(nbytes: float) -> str:
    """Bytes in GiB, or in MiB below one GiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2 ** 20:.1f} MiB"


# ---------------------------------------------------------------- where the figures came from

def machine_lines(machine: dict, command: str) -> list[str]:
    """Which machine and settings a JSON's figures came from, and which of them hold only on some CPUs."""
    onednn = ", ".join(f"{k}={v or '(unset)'}" for k, v in machine["onednn"].items())
    gpus = ", ".join(g["name"] for g in machine["gpus"]) or "none"
    cpu_id = f" ({machine['cpu_id']})" if machine.get("cpu_id") else ""
    lines = [f"- CPU: {machine['cpu']}{cpu_id}, {machine['cores']} cores usable; "
             f"ISA: {', '.join(machine['isa'] or ['unknown'])}",
             f"- GPUs: {gpus}; TensorFlow {machine['tensorflow']}; oneDNN: {onednn}; "
             f"{machine['threads']} intra-op threads; gate math: {machine['gate_math']}",
             f"- precision this machine chooses: {machine['precision_choice']['reason']}",
             f"- command: `{command}`"]
    bf16 = hardware.emulated("mixed_bfloat16", machine)
    lines.append(f"- bf16 figures: **emulated here** ({bf16}); they say nothing about a CPU that computes bf16 natively"
                 if bf16 else "- bf16 figures hold only on CPUs that compute bf16 natively (AVX512_BF16 or AMX); "
                 "elsewhere bf16 is emulated, slower than fp32")
    return lines


# ---------------------------------------------------------------- the step benchmark

def step_table(result: dict) -> str:
    """The step-rate rows: the project's step against the chained matmul limit and the Keras baselines."""
    limits = {(x["hidden"], x["dtype"]): x["flops_per_s"] for x in result["limits"]}
    keras = {(b["variant"], b["hidden"], b["seq_length"], b["precision"]): b["chars_per_s"] for b in result["baseline"]}
    lines = ["| hidden | batch x seq | precision | matmul limit (chained) | this project | of the limit "
             "| Keras, weight norm per step | project / it | Keras, no weight norm | project / it |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["project"]:
        limit = limits[p["hidden"], "float32" if p["precision"] == "fp32" else "bfloat16"]
        row = (f"| {p['hidden']} | {p['batch']} x {p['seq_length']} | {p['precision']} | {limit / 1e9:.0f} GFLOP/s "
               f"| {p['chars_per_s']:,.0f} chars/s = {p['flops_per_s'] / 1e9:.0f} GFLOP/s "
               f"| {p['fraction_of_matmul_limit']:.0%} |")
        for variant in BASELINES:
            rate = keras.get((variant, p["hidden"], p["seq_length"], p["precision"]))
            row += f" {rate:,.0f} chars/s | {p['chars_per_s'] / rate:.2f}x |" if rate else " not run | |"
        lines.append(row)
    return "\n".join(lines)


def scaling_table(scaling: dict) -> str:
    rates, efficiency = scaling["chars_per_s_per_worker"], scaling["efficiency"]
    names = {"independent": "2 independent processes, no Horovod (the machine's ceiling)",
             "gloo": "`horovodrun --gloo -np 2`, project default `--cycle_time_ms=20`",
             "mpi": "`horovodrun --mpi -np 2`, `--cycle_time_ms=20`",
             "gloo_cycle_1ms": "`horovodrun --gloo -np 2`, `--cycle_time_ms=1` (Horovod's own default)"}
    lines = [f"Scaling: real `train.py` jobs, hidden {scaling['hidden']}, {scaling['batch_per_worker']} x "
             f"{scaling['seq_length']} per worker, {scaling['precision']}, one thread per process:", "",
             "| run | chars/s per worker | efficiency vs 1 process |", "| --- | ---: | ---: |",
             f"| 1 process | {rates['1']:,.0f} | |"]
    lines += [f"| {names.get(name, name)} | {rates['2_' + name]:,.0f} | {value:.2f} |" for name, value in efficiency.items()]
    return "\n".join(lines)


PROJECTED_FROM_HIDDEN = 1024  # smaller steps are dominated by per-step overhead, not by matmuls as a GPU's would be


def gpu_projection_lines(result: dict) -> list[str]:
    """The paper's 4096-unit model on a V100 and an H100 at the share of the matmul limit the project's
    bf16 step reached here (at the largest hidden size measured, if at least PROJECTED_FROM_HIDDEN)."""
    bf16 = [p for p in result["project"] if p["precision"] != "fp32" and p["hidden"] >= PROJECTED_FROM_HIDDEN]
    if not bf16:
        return [f"No GPU projection: this run measured no bf16 step at hidden {PROJECTED_FROM_HIDDEN} or more."]
    measured = max(bf16, key=lambda p: (p["hidden"], p["fraction_of_matmul_limit"]))
    g = projection.gpu_projection(4096, measured["fraction_of_matmul_limit"])
    return ["**PROJECTION (not measured)** for the paper's 4096-unit model: a GPU whose kernels reach the share of "
            f"their peak that this project's bf16 step reached of this CPU's chained matmul limit (hidden "
            f"{measured['hidden']}, {measured['batch']} x {measured['seq_length']}: "
            f"{measured['fraction_of_matmul_limit']:.0%}"
            + (", counted as 100%: no GPU runs above its peak" if measured["fraction_of_matmul_limit"] > 1 else "")
            + f"), at {g['flops_per_char'] / 1e6:,.0f} M matmul FLOPs per "
            "character (`model.flops_per_char`):", "",
            "| | chars/s per GPU | how |", "|---|---:|---|",
            f"| the paper, per V100 | {g['paper_chars_per_s_per_v100']:,.0f} | measured by the paper: "
            f"{g['paper_share_of_v100_peak']:.0%} of the V100's fp16 tensor peak |",
            f"| V100 (125 TFLOP/s fp16) | {g['v100_chars_per_s']:,.0f} | projection |",
            f"| H100 SXM (989 TFLOP/s bf16, dense) | {g['h100_chars_per_s']:,.0f} | projection |", "",
            "On a GPU the gate math runs as TensorFlow's ops (the fused kernels are CPU-only), so a GPU's share "
            "of its peak may well be lower; the projection assumes it is not."]


def step_section(result: dict) -> list[str]:
    lines = [step_table(result), ""]
    ratios = result.get("ratios", {})
    if ratios:
        lines += ["Ratios measured within this run: " + "; ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), ""]
    if "scaling" in result:
        lines += [scaling_table(result["scaling"]), ""]
    if "input" in result:
        lines += [f"Input: the window pipeline delivers {result['input']['pipeline_bytes_per_s'] / 1e6:.1f} MB/s per "
                  f"rank; preprocessing writes {result['input']['preprocess_mb_per_s']:.1f} MB/s (one process).", ""]
    return lines + gpu_projection_lines(result)


# ---------------------------------------------------------------- --profile

def profile_table(p: dict) -> str:
    """One profile: op time per update by kind, and the unprofiled forward/backward split."""
    backward = (f"{p['backward_flops_per_s'] / 1e9:.0f} GFLOP/s" if p["backward_flops_per_s"]
                else "(not measurable: the forward median is not below the update's)")
    lines = [f"hidden {p['hidden']}, {p['batch']} x {p['seq_length']}, {p['precision']}: "
             f"{p['wall_seconds_per_step'] * 1e3:,.0f} ms per step, {p['op_seconds_per_step'] * 1e3:,.0f} ms in ops "
             f"(summed over threads)",
             f"unprofiled: update {p['update_seconds'] * 1e3:,.0f} ms, of which forward {p['forward_seconds'] * 1e3:,.0f} ms "
             f"at {p['forward_flops_per_s'] / 1e9:.0f} GFLOP/s; backward and Adam at {backward}", "",
             "| kind of op | ms per step | share of op time |",
             "|---|---:|---:|"]
    lines += [f"| {kind} | {s * 1e3:,.1f} | {s / p['op_seconds_per_step']:.1%} |" for kind, s in p["kinds"].items()]
    outside = p["wall_seconds_per_step"] - p["op_seconds_per_step"]
    if outside > 0:
        lines.append(f"| wall time in no traced op (loop control, executor, waits) | {outside * 1e3:,.1f} | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- --paper

def paper_progress(run: dict) -> str:
    m = run["memory"]
    return (f"[bench] paper shape hidden {run['hidden']}, {run['streams']} streams x {run['seq_length']}, "
            f"{run['precision']}, k={run['micro_batches']}: update {run['update_seconds']:.1f} s, peak RSS "
            f"{m['max_rss_after_update'] / GIB:.2f} GiB, growth {m['growth_in_update'] / GIB:.2f} GiB, tensors "
            f"{m['tensor_growth_in_update'] / GIB:.2f} GiB")


def measured_rows(result: dict) -> list[str]:
    m, act = result["memory"], result["activations"]
    return [f"| peak RSS of the process (ru_maxrss) | {gib(m['max_rss_after_update'])} | measured |",
            f"| model built (RSS before the update) | {gib(m['rss_model_built'])} | measured |",
            f"| growth in the update (RSS) | {gib(m['growth_in_update'])} | measured |",
            f"| tensors alive at once in the update, beyond the model and Adam | {gib(m['tensor_growth_in_update'])} "
            "| measured (TensorFlow's allocator) |",
            f"| activations at the update's peak | {gib(act['total'])} | estimated (`model.activation_bytes`): "
            + ", ".join(f"{k} {gib(v)}" for k, v in act.items() if k != "total") + " |",
            f"| parameters ({result['parameters']:,}) | {gib(result['parameter_bytes'])} | real variables |",
            f"| optimizer state (Adam) | {gib(result['optimizer_bytes'])} | real variables |",
            f"| allreduced per step, float32 / --fp16_allreduce | {gib(result['allreduce_bytes']['fp32'])} / "
            f"{gib(result['allreduce_bytes']['fp16_allreduce'])} | real gradients |",
            f"| checkpoint, rank 0's model + optimizer | {gib(result['checkpoint_bytes'])} | "
            "written with tf.train.Checkpoint |",
            f"| RNN state, per rank / whole job at 128 ranks | {gib(result['rnn_state_bytes_per_rank'])} / "
            f"{gib(128 * result['rnn_state_bytes_per_rank'])} | written with checkpoint.save_state_rows |",
            f"| update time | {result['update_seconds']:.1f} s ({result['chars_per_s']:,.0f} chars/s) | measured |"]


def fit_rows(result: dict) -> list[str]:
    fit = result["fit"]
    lines = [f"Activations per stream: estimated {gib(result['computed_activation_bytes_per_stream'])}"
             + (f"; measured fit {gib(fit['slope_bytes_per_stream'])} per stream over {fit['streams']} streams "
                f"(intercept {gib(fit['intercept_bytes'])}; working set estimated "
                f"{gib(result['computed_need']['working_set'])})" if fit else "; no fit (one stream count)"), "",
             "| streams | update s | peak RSS | tensors in the update | their growth per stream since the row above "
             "| estimated activations |", "|---:|---:|---:|---:|---:|---:|"]
    steps = [None] + (fit["slopes_between_runs"] if fit else [])
    for r, slope in zip(result["runs"], steps):
        estimate = activation_bytes(r["hidden"], r["streams"] // r["micro_batches"], r["seq_length"], r["precision"])
        lines.append(f"| {r['streams']} | {r['update_seconds']:.1f} | {gib(r['memory']['max_rss_after_update'])} | "
                     f"{gib(r['memory']['tensor_growth_in_update'])} | {gib(slope) if slope else ''} | "
                     f"{gib(estimate['total'])} |")
    return lines


def paper_tables(result: dict) -> str:
    """The measurement, the fit and the capacity as Markdown tables."""
    lines = [f"hidden {result['hidden']}, {result['streams']} streams x {result['seq_length']} bytes per rank, "
             f"{result['precision']}, {result['micro_batches']} micro-batch(es); one update in a fresh process", "",
             "| quantity | bytes | how |", "|---|---:|---|", *measured_rows(result), "", *fit_rows(result)]
    return "\n".join(lines + ["", capacity_tables(result, result["capacity"])])


def capacity_tables(result: dict, cap: dict) -> str:
    """capacity.capacity(result, streams) as Markdown: per rank, per job, and the allreduce projection."""
    lines = [f"Per rank at {cap['streams_per_rank']} streams (estimated device bytes: weights + Adam, working set, "
             "activations of one micro-batch; no CUDA context or workspaces, about 1 GiB more on a GPU). Rows with "
             "k > 1 run the micro-batches one after another, as train.py's step does:", "",
             "| --backward_passes_per_step | streams per micro-batch | per-rank memory | from the fit | "
             + " | ".join(DEVICE_MEMORY) + " |", "|---:|---:|---:|---:|" + "---|" * len(DEVICE_MEMORY)]
    for row in cap["per_rank"]:
        lines.append(f"| {row['micro_batches']} | {row['streams_per_micro_batch']} | {gib(row['computed']['total'])} | "
                     + (gib(row["from_fit"]) if "from_fit" in row else "") + " | "
                     + " | ".join("fits" if ok else "**does not fit**" for ok in row["fits"].values()) + " |")
    lines += ["", "| ranks | global streams | chars per step | memory, all ranks | RNN state | checkpoint | "
              "allreduce sent per rank, fp32 / fp16 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for j in cap["jobs"]:
        sent = j["allreduce_bytes_per_rank"]
        lines.append(f"| {j['ranks']} | {j['global_streams']:,} | {j['chars_per_step']:,} | {gib(j['memory_bytes'])} | "
                     f"{gib(j['rnn_state_bytes'])} | {gib(j['checkpoint_bytes'])} | "
                     f"{gib(sent['fp32'])} / {gib(sent['fp16_allreduce'])} |")
    lines += ["", "PROJECTION (not measured): ring allreduce of one step's gradients on 16 DGX-1 nodes, "
              "2(N-1)/N x bytes / bandwidth, NVLink 150 GB/s per GPU, 4 x 100 Gb/s EDR per node, latency ignored:", "",
              "| gradients | flat, one ring (100 Gb/s) | flat, four rings (4 x 100 Gb/s) | hierarchical (NVLink + IB) |",
              "|---|---:|---:|---:|"]
    for name, p in cap["allreduce_projection"].items():
        lines.append(f"| {name}: {gib(result['allreduce_bytes'][name])} | {p['flat_one_ring'] * 1e3:.1f} ms | "
                     f"{p['flat_four_rings'] * 1e3:.1f} ms | {p['hierarchical'] * 1e3:.1f} ms "
                     f"({p['hierarchical_nvlink_part'] * 1e3:.1f} + {p['hierarchical_infiniband_part'] * 1e3:.1f}) |")
    return "\n".join(lines)


# ---------------------------------------------------------------- --inference

def inference_table(result: dict) -> str:
    """The featuriser's rate at each shape against the chained matmul limit of its dtype and batch."""
    about = result["inference"]
    lines = [f"Featurising {about['texts']:,} texts of `{os.path.basename(about['texts_file'])}` with the "
             f"{'randomly initialised' if about['model_dir'] == 'random' else 'trained'} model(s); FLOPs are the "
             "recurrent matmuls (the input projection is looked up, the softmax not computed); the limit is read "
             "after each pass for as long as the pass, its median shown, and the share is the median of each "
             "pass's over its own reading:",
             "", "| hidden | precision | batch | chunk | window (batches) | texts/s | chars/s | padding "
             "| forward rate | matmul limit (chained) | of the limit |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['hidden']} | {r['precision']} | {r['batch_size']} | {r['chunk']} | {r['window_batches']} "
                     f"| {r['texts_per_s']:,.1f} | {r['chars_per_s']:,.0f} | {r['padding_share']:.1%} "
                     f"| {r['flops_per_s'] / 1e9:.1f} GFLOP/s | {r['limit_flops_per_s'] / 1e9:.1f} GFLOP/s "
                     f"| {r['efficiency']:.0%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the generated page

def section(path: str, result: dict) -> list[str]:
    """One JSON's figures under the description of the machine they came from."""
    if not isinstance(result, dict) or "precision_choice" not in result.get("machine", {}):
        raise ValueError(f"{path}: not a result of this benchmark (no machine description with a precision choice)")
    kinds = {"profiles": "profile", "capacity": "capacity", "inference": "inference"}
    kind = next((k for key, k in kinds.items() if key in result), "step")
    title = {"step": "Step rates", "profile": "Where the step's time goes", "capacity": "The paper's per-rank shape",
             "inference": "Featurisation rates"}
    lines = [f"## {title[kind]}: `{os.path.basename(path)}`", "", *machine_lines(result["machine"], result["command"]), ""]
    if kind == "step":
        return lines + step_section(result)
    if kind == "profile":
        return lines + [line for p in result["profiles"] for line in (profile_table(p), "")]
    if kind == "inference":
        return lines + [inference_table(result)]
    return lines + [paper_tables(result)]


def document(paths: list[str]) -> str:
    """The generated page: every JSON's section, then the published figures the projections use."""
    lines = ["# Benchmark results", "", "Generated by `python -m horovod_mlstm.bench.report "
             + " ".join(paths) + "` (`make bench-docs`); do not edit by hand. What each figure means and what "
             "limits it: docs/PERFORMANCE.md and docs/CAPACITY.md.", ""]
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
        lines += section(path, result) + [""]
    lines += ["## Published figures the projections use", ""] + [f"- {s}" for s in figures.sources()]
    return "\n".join(lines) + "\n"


def main(argv):
    paths = argv[1:]
    if not paths:
        sys.exit("error: name at least one benchmark JSON file")
    try:
        if FLAGS.output:
            files.check_writable(FLAGS.output, "--output")
        text = document(paths)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if FLAGS.output:
        with files.replace_whole(FLAGS.output) as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    flags.DEFINE_string("output", "", "Write the page here (whole or not at all); default: standard output.")
    app.run(main)
