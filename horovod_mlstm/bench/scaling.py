"""1 process against 2 on this machine, with real train.py jobs: Horovod with Gloo and with MPI at the
project's cycle time, Gloo at Horovod's own 1 ms cycle, and two independent single-process jobs (what
the machine itself gives two concurrent trainings, the ceiling for Horovod).
"""

from __future__ import annotations

import re
import tempfile

import numpy as np

from horovod_mlstm import corpus, jobs
from horovod_mlstm.records import write_corpus

PRECISION = "fp32"  # pinned, so that the efficiency compares communication, not a CPU's bf16
RUNS = {"2_gloo": ("gloo", ()), "2_mpi": ("mpi", ()), "2_gloo_cycle_1ms": ("gloo", ("--cycle_time_ms=1",)),
        "2_independent": ("independent", ())}


def train_rate(np_: int, hidden: int, batch: int, seq: int, steps: int, data_dir: str,
               controller: str = "gloo", extra: tuple[str, ...] = ()) -> list[float]:
    """Median chars/s per worker of real train.py runs, one thread per process.

    np_ > 1 with controller "gloo" or "mpi" is one horovodrun job of np_ ranks (one figure);
    controller "independent" is np_ separate single-process jobs started together (one figure per job).
    """
    def args():
        return [f"--model_dir={tempfile.mkdtemp(prefix='bench-run-')}", f"--data_dir={data_dir}",
                f"--hidden_size={hidden}", f"--batch_size_per_worker={batch}", f"--seq_length={seq}",
                f"--train_steps={steps}", "--log_every=2", "--eval_every=0", "--eval_windows=1",
                f"--checkpoint_every={steps}", "--warmup_steps=1", "--intra_op_threads=1", "--inter_op_threads=1",
                f"--precision={PRECISION}", *extra]

    if controller == "independent":
        outputs = jobs.run_together([args() for _ in range(np_)])
    else:
        outputs = [jobs.run(args(), np_, controller)]
    rates = []
    for text in outputs:
        per_worker = [float(v.replace(",", "")) for v in re.findall(r"\(([\d,]+)/worker\)", text)]
        rates.append(float(np.median(per_worker[1:] or per_worker)))  # the first window includes tracing
    return rates


def scaling(quick: bool) -> dict:
    """chars/s per worker of 1 process and of each 2-process run, and each one's efficiency."""
    hidden, batch, seq, steps = (32, 4, 16, 6) if quick else (1024, 32, 128, 12)
    with tempfile.TemporaryDirectory() as data_dir:
        write_corpus(corpus.texts(3000, seed=4), data_dir, num_shards=2, val_fraction=0.05, test_fraction=0.05)
        one = train_rate(1, hidden, batch, seq, steps, data_dir)[0]
        two = {name: float(np.mean(train_rate(2, hidden, batch, seq, steps, data_dir, controller, extra)))
               for name, (controller, extra) in RUNS.items()}
    print(f"[bench] scaling hidden {hidden}, {batch}x{seq} per worker: 1 process {one:,.0f} chars/s; 2 processes "
          "per worker: " + ", ".join(f"{name.removeprefix('2_')} {v:,.0f} (efficiency {v / one:.2f})"
                                     for name, v in two.items()), flush=True)
    return {"hidden": hidden, "batch_per_worker": batch, "seq_length": seq, "precision": PRECISION,
            "chars_per_s_per_worker": {"1": one, **two},
            "efficiency": {name.removeprefix("2_"): v / one for name, v in two.items()}}
