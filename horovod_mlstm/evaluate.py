"""Bits per character of a trained model on a split, and its CLI.

    python -m horovod_mlstm.evaluate --model_dir M --data_dir D --split test [--output F.json]
    horovodrun -np 2 -H localhost:2 python -m horovod_mlstm.evaluate ...   # ranks split the work

The split is laid out as --batch_size_per_worker streams per rank (data.split_streams), the
same layout whatever the number of ranks, so the result does not depend on it.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from horovod_mlstm import data, distributed as dist, files
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.flags import CommonConfig, define_common
from horovod_mlstm.inference import load_trained_model
from horovod_mlstm.metrics import bpc_and_chars
from horovod_mlstm.records import SPLITS, DataError


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        common = CommonConfig.from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    dist.init(common.intra_op_threads, common.inter_op_threads)
    data_dir = common.data_path
    output = FLAGS.output or os.path.join(common.model_dir, f"eval_{FLAGS.split}.json")
    rows = common.batch_size_per_worker
    try:
        if dist.is_chief():
            files.check_writable(output, "--output")
        model = load_trained_model(common.model_dir)
        streams = data.split_streams(data_dir, FLAGS.split, rows * dist.size(), common.seq_length,
                                     dist.rank() * rows, rows)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    start = time.time()
    bpc, scored = bpc_and_chars(model, streams)
    total = data.split_bytes(data_dir, FLAGS.split)
    result = {"model_dir": common.model_dir, "data_dir": data_dir, "split": FLAGS.split, "bpc": bpc,
              "bytes_scored": scored, "bytes_in_split": total, "ranks": dist.size(),
              "seconds": time.time() - start}
    if dist.is_chief():
        print(f"[evaluate] {FLAGS.split}: {bpc:.4f} bits per character over {scored:,} of {total:,} bytes "
              f"({dist.size()} rank(s))", flush=True)
        try:
            files.write_json(output, result)
        except OSError as e:
            sys.exit(f"error: cannot write {output}: {e.strerror} (the result is printed above)")
        print(f"[evaluate] written to {output}", flush=True)


if __name__ == "__main__":
    define_common()
    flags.DEFINE_enum("split", "test", list(SPLITS), "Which split to score.")
    flags.DEFINE_string("output", "", "JSON file for the result; default MODEL_DIR/eval_<split>.json.")
    app.run(main)
