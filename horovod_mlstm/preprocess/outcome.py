"""What rank 0 makes of a pass over the input: fail, run once more, or merge and publish this manifest.

A pass fails on any rank's error, on no usable record, on more skipped records than
--max_bad_fraction, or on far more shards than reviews. A small corpus whose val or test split
came out under --min_eval_bytes gets one more pass with fractions that reach it (from the
histogram of bytes over low split positions the workers returned). Otherwise the counts become
the manifest, and the run ends with one line of totals.
"""

from __future__ import annotations

import collections

from absl import logging

from horovod_mlstm.preprocess.settings import BUCKET, BUCKETS, EVAL_FRACTION_CAP, Options
from horovod_mlstm.preprocess.worker import chunk_name
from horovod_mlstm.records import SPLITS, splits_manifest

SMALL_CORPUS_BYTES = 1 << 30  # only a corpus with less text gets a second pass for --min_eval_bytes


def decide(outcomes: dict, ranks: int, plans: list, opts: Options, max_bad_fraction: float, min_eval_bytes: int,
           requested: tuple[float, float]) -> tuple:
    """Rank 0, after a pass: ("fail", line), ("rerun", val, test) or ("merge", chunk layout, manifest)."""
    failures = [(rank, error) for rank, (_, error) in sorted(outcomes.items()) if error not in (None, "stopped")]
    if failures:
        rank, error = failures[0]
        return "fail", f"rank {rank}: {error}" if ranks > 1 else error
    results = sorted((r for (rank_results, _), _ in outcomes.values() for r in rank_results), key=lambda r: r["key"])
    low = [sum(column) for column in zip(*(rank_low for (_, rank_low), _ in outcomes.values() if rank_low))]
    records, nbytes, per_file = _counts(results, plans, opts.num_shards)
    skipped = sum((f["skipped"] for f in per_file), collections.Counter())
    refusal = _refusal(plans, sum(map(sum, records.values())), skipped, opts.num_shards, max_bad_fraction)
    if refusal:
        return "fail", refusal
    totals = {s: sum(nbytes[s]) for s in SPLITS}
    if (opts.val_fraction, opts.test_fraction) == requested and sum(totals.values()) < SMALL_CORPUS_BYTES:
        raised = eval_fractions(low, totals, opts, min_eval_bytes)
        if raised != requested:
            return "rerun", *raised
    _say_what_the_eval_splits_got(totals, opts, min_eval_bytes, requested)
    layout = [(chunk_name(r["key"]), r["groups"]) for r in results if r["groups"]]
    manifest = {
        "splits": splits_manifest(records, nbytes, opts.num_shards),
        "formats": sorted({p.fmt for p in plans}),
        "files": [{**f, "skipped": dict(sorted(f["skipped"].items()))} for f in per_file],
        "skipped": dict(sorted(skipped.items())),
        "val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction,
        "requested_fractions": list(requested), "min_eval_bytes": min_eval_bytes,
    }
    return "merge", layout, manifest


def _counts(results: list[dict], plans: list, num_shards: int) -> tuple[dict, dict, list[dict]]:
    """Records and bytes per split and shard, and reviews and skipped records per input file."""
    records = {s: [0] * num_shards for s in SPLITS}
    nbytes = {s: [0] * num_shards for s in SPLITS}
    per_file = [{"file": p.path, "format": p.fmt, "reviews": 0, "skipped": collections.Counter()} for p in plans]
    for result in results:
        for (split, shard), n, size in result["groups"]:
            records[SPLITS[split]][shard] += n
            nbytes[SPLITS[split]][shard] += size
            per_file[result["file"]]["reviews"] += n
        per_file[result["file"]]["skipped"].update(result["skipped"])
    return records, nbytes, per_file


def _refusal(plans: list, good: int, skipped: collections.Counter, num_shards: int,
             max_bad_fraction: float) -> str | None:
    """The one line that fails a pass whose records are unusable, or None."""
    bad = sum(skipped.values())
    if good == 0:
        return f"{', '.join(p.path for p in plans)}: no usable records (skipped: {reasons(skipped)})"
    if bad / (good + bad) > max_bad_fraction:
        return (f"{bad:,} of {good + bad:,} records were skipped ({reasons(skipped)}), more than "
                f"--max_bad_fraction={max_bad_fraction}")
    if 1 < num_shards > good:
        return (f"--num_shards={num_shards} is more than the {good:,} reviews, so most of the "
                f"{3 * num_shards:,} shard files would be empty; use at most that many (and at least "
                "the number of training ranks)")
    return None


def _say_what_the_eval_splits_got(totals: dict, opts: Options, min_eval_bytes: int,
                                  requested: tuple[float, float]) -> None:
    """A warning for a val or test split still under --min_eval_bytes; one line when the fractions were raised."""
    for split in ("val", "test"):
        fraction = getattr(opts, f"{split}_fraction")
        if fraction > 0 and totals[split] < min_eval_bytes:
            logging.warning("the %s split has %d bytes, fewer than --min_eval_bytes=%d with --%s_fraction=%g: raise "
                            "the fraction, or training may need a smaller --eval_batch_size or --seq_length",
                            split, totals[split], min_eval_bytes, split, fraction)
    if (opts.val_fraction, opts.test_fraction) != requested:
        print(f"[preprocess] small corpus: --val_fraction {requested[0]:g} -> {opts.val_fraction:g}, "
              f"--test_fraction {requested[1]:g} -> {opts.test_fraction:g}, so that each split has at least "
              f"--min_eval_bytes={min_eval_bytes} (--min_eval_bytes=0 keeps the fractions)", flush=True)


def eval_fractions(low: list[int], totals: dict, opts: Options, min_eval_bytes: int) -> tuple[float, float]:
    """val/test fractions giving each split at least min_eval_bytes (up to EVAL_FRACTION_CAP), from the bytes
    of this pass's records on low split positions (`low`, buckets of BUCKET); explicit zeros stay zero."""
    cumulative = [0]
    for nbytes in low:
        cumulative.append(cumulative[-1] + nbytes)

    def edge_reaching(floor_bytes: int, fallback: float) -> float:  # the first bucket edge with enough below it
        k = next((k for k, c in enumerate(cumulative) if c >= floor_bytes), None)
        return fallback if k is None else k * BUCKET

    val, test = opts.val_fraction, opts.test_fraction
    if 0 < val < EVAL_FRACTION_CAP and totals["val"] < min_eval_bytes:
        val = round(min(EVAL_FRACTION_CAP, max(val, edge_reaching(min_eval_bytes, EVAL_FRACTION_CAP))), 6)
    if 0 < test < EVAL_FRACTION_CAP and (totals["test"] < min_eval_bytes or val != opts.val_fraction):
        below_val = cumulative[min(BUCKETS, -int(-val // BUCKET))]  # val's bytes, its last bucket counted whole
        end = edge_reaching(below_val + min_eval_bytes, val + EVAL_FRACTION_CAP)
        test = round(min(EVAL_FRACTION_CAP, max(test, end - val)), 6)
    return val, test


def reasons(skipped: dict) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"


def report(output_dir: str, manifest: dict, input_bytes: int, seconds: float) -> None:
    """The run's last line: reviews and bytes per split, the rate, and what was skipped and why."""
    splits = manifest["splits"]
    reviews = sum(splits[s]["reviews"] for s in SPLITS)
    text = sum(splits[s]["bytes"] for s in SPLITS)
    shards = len(splits["train"]["shards"])
    print(f"[preprocess] {output_dir}: {reviews:,} reviews, {text:,} bytes of text ("
          + ", ".join(f"{s} {splits[s]['reviews']:,} / {splits[s]['bytes']:,} B" for s in SPLITS)
          + f") in {shards} shard(s) per split, from {input_bytes / 1e6:,.1f} MB of input in {seconds:.1f} s = "
          f"{input_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s; skipped {sum(manifest['skipped'].values()):,}"
          f" ({reasons(manifest['skipped'])})", flush=True)
