"""The command line: `python -m horovod_mlstm.preprocess --input FILES --output_dir DIR ...`.

Every flag is one argument of pipeline.preprocess. A problem is one `error:` line (from rank 0
under MPI) and exit status 1; a stop signal exits 143 (SIGINT: 130) with nothing published.
"""

from __future__ import annotations

import sys

from absl import app, flags

from horovod_mlstm import corpus
from horovod_mlstm.preprocess.pipeline import preprocess
from horovod_mlstm.preprocess.settings import EVAL_FRACTION_CAP, FORMATS, MB, PreprocessError
from horovod_mlstm.preprocess.world import STOP_SIGNALS, ReportedElsewhere, Stopped, World, stop_on_signals
from horovod_mlstm.records import DataError


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command's flags, into `flag_values` (absl's global FLAGS when run; a fresh FlagValues in tests)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_multi_string("input", None, "Input files (repeat the flag, or list them after one --input).", **fv)
    flags.DEFINE_string("output_dir", "data/reviews", "Where the shards and manifest.json go.", **fv)
    flags.DEFINE_integer("num_shards", 8, "Shards per split (at least the number of training ranks, at most "
                         "the number of training reviews).", **fv)
    flags.DEFINE_enum("format", "auto", list(FORMATS), "Input format; auto decides per file.", **fv)
    flags.DEFINE_string("text_field", "reviewText", "amazon_json: the field holding the review text.", **fv)
    flags.DEFINE_string("csv_column", "sentence", "csv: the column holding the text.", **fv)
    flags.DEFINE_bool("text_whole_file", False, "text: each file is one document (default: one per line).", **fv)
    flags.DEFINE_float("val_fraction", 0.001, "Share of reviews in the validation split.", **fv)
    flags.DEFINE_float("test_fraction", 0.001, "Share of reviews in the test split.", **fv)
    flags.DEFINE_integer("min_eval_bytes", 32768, "A small corpus gets larger val/test fractions (up to "
                         f"{EVAL_FRACTION_CAP}) so each split has at least this many bytes; 0 keeps the fractions.",
                         **fv)
    flags.DEFINE_integer("workers", 1, "Processes per rank (per machine) working on chunks in parallel.", **fv)
    flags.DEFINE_float("chunk_mb", 32, "Size of a unit of work; memory per worker grows with it.", **fv)
    flags.DEFINE_integer("max_record_bytes", 16 * MB, "Longer lines are skipped (counted) without being held in "
                         "memory; a CSV line or --text_whole_file document longer than this is an error.", **fv)
    flags.DEFINE_float("max_bad_fraction", 0.01, "Stop with an error when more records than this are skipped.", **fv)
    flags.DEFINE_bool("builtin", False, "Write the built-in synthetic corpus instead of reading --input.", **fv)


def arguments(flag_values: flags.FlagValues, argv: list[str]) -> dict:
    """pipeline.preprocess's arguments from the parsed flags; `--input a b c` puts b and c in argv."""
    return dict(inputs=(flag_values.input or []) + argv[1:], output_dir=flag_values.output_dir,
                num_shards=flag_values.num_shards, fmt=flag_values.format, workers=flag_values.workers,
                max_bad_fraction=flag_values.max_bad_fraction, val_fraction=flag_values.val_fraction,
                test_fraction=flag_values.test_fraction, min_eval_bytes=flag_values.min_eval_bytes,
                max_record_bytes=flag_values.max_record_bytes, chunk_mb=flag_values.chunk_mb,
                text_field=flag_values.text_field, csv_column=flag_values.csv_column,
                text_whole_file=flag_values.text_whole_file)


def main(argv):
    FLAGS = flags.FLAGS
    if FLAGS.builtin:
        corpus.prepare_builtin(FLAGS.output_dir)
        print(f"[preprocess] built-in corpus in {FLAGS.output_dir}")
        return
    stop_on_signals()
    world = None
    try:
        world = World()
        preprocess(**arguments(FLAGS, argv), world=world)
        status = None
    except (PreprocessError, DataError) as e:
        status = f"error: {e}" if world is None or world.rank == 0 else 1  # every rank checks flags: one says so
    except ReportedElsewhere:
        status = 1
    except Stopped as stop:  # no goodbyes: the other ranks may be gone already
        if world is None or world.rank == 0:
            print(f"error: stopped by {stop.args[0]}; nothing was published, {FLAGS.output_dir} keeps its previous "
                  "output", file=sys.stderr, flush=True)
        sys.exit(STOP_SIGNALS[stop.signum])
    if world is not None:
        world.barrier()
    sys.exit(status)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
