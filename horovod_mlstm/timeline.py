"""What a training step's allreduce costs, read from a Horovod timeline (launchers' --timeline FILE).

`python -m horovod_mlstm.timeline FILE` prints each allreduced tensor (shape, bytes) and, as medians over the
steps, the wall time of each phase of one step's allreduce: NEGOTIATE_ALLREDUCE (from the first rank's
request until every rank has asked for the tensor, so mostly waiting for the slowest rank) and ALLREDUCE
(the reduction itself, with its parts MEMCPY_IN_FUSION_BUFFER, MPI_/GLOO_ALLREDUCE, MEMCPY_OUT_FUSION_BUFFER).
docs/CLUSTER.md shows the output for the CPU demo. Horovod writes one process per tensor ("pid") with
nested B/E (begin/end) events, the shape and dtype on the ALLREDUCE end event.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass

import numpy as np


@dataclass
class Span:
    tensor: str
    activity: str
    start_us: int
    end_us: int
    args: dict


def load_spans(path: str) -> list[Span]:
    """The timeline's begin/end pairs, per tensor; ValueError if the file is not a timeline."""
    try:
        with open(path) as f:
            events = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"not a readable Horovod timeline: {e}") from None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError("not a Horovod timeline: expected a JSON list of trace events")
    try:
        names = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e.get("args", {})}
        open_spans, spans = collections.defaultdict(list), []
        for e in events:
            if e.get("ph") == "B":
                open_spans[e["pid"]].append(e)
            elif e.get("ph") == "E" and open_spans[e["pid"]]:
                begin = open_spans[e["pid"]].pop()
                spans.append(Span(names.get(e["pid"], str(e["pid"])), begin["name"], begin["ts"], e["ts"],
                                  e.get("args", {})))
    except KeyError as e:
        raise ValueError(f"not a Horovod timeline: a trace event lacks {e}") from None
    return spans


def group_name(tensor: str) -> str:
    """Tensors allreduced together (Horovod's grouped allreduce names them `..._3of12`) form one group."""
    return re.sub(r"_\d+of\d+$", "", tensor)


def summarize(spans: list[Span]) -> tuple[list[dict], dict[str, dict]]:
    """Per allreduced tensor: group, shape, dtype, bytes, times seen. Per group (the gradients are one group,
    allreduced once a step): its rounds (the k-th allreduce of each of its tensors is round k), the median
    interval between the starts of consecutive rounds (the step time), and per phase its median wall time in
    ms (first start to last end over the group's tensors) with the number of rounds it occurred in."""
    per_tensor = collections.defaultdict(lambda: collections.defaultdict(list))
    for span in spans:
        per_tensor[span.tensor][span.activity].append(span)
    tensors = {name: acts for name, acts in per_tensor.items() if "ALLREDUCE" in acts}
    if not tensors:
        raise ValueError("the timeline has no allreduce")
    rows, groups = [], collections.defaultdict(dict)
    for name, acts in sorted(tensors.items()):
        end = acts["ALLREDUCE"][-1].args
        shape, dtype = json.loads(end.get("shape", "[]")), end.get("dtype", "float32")
        rows.append({"tensor": name, "group": group_name(name), "shape": shape, "dtype": dtype,
                     "times": len(acts["ALLREDUCE"]), "bytes": math.prod(shape) * np.dtype(dtype).itemsize})
        groups[group_name(name)][name] = acts
    summary = {}
    for group, members in groups.items():
        rounds = min(len(acts["ALLREDUCE"]) for acts in members.values())
        walls = collections.defaultdict(list)
        for phase in sorted({activity for acts in members.values() for activity in acts}):
            for k in range(rounds):
                step = [acts[phase][k] for acts in members.values() if len(acts[phase]) > k]
                if step:
                    walls[phase].append((max(s.end_us for s in step) - min(s.start_us for s in step)) / 1000)
        starts = [min(acts["NEGOTIATE_ALLREDUCE"][k].start_us for acts in members.values()) / 1000
                  for k in range(rounds)]
        summary[group] = {"rounds": rounds, "interval_ms": statistics.median(np.diff(starts)) if rounds > 1 else None,
                          "phases": {phase: (statistics.median(ms), len(ms)) for phase, ms in walls.items()}}
    return rows, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timeline", help="a Horovod timeline JSON (launch/*.sh --timeline FILE)")
    args = parser.parse_args(argv)
    try:
        rows, summary = summarize(load_spans(args.timeline))
    except ValueError as e:
        sys.exit(f"error: {args.timeline}: {e}")
    print(f"{'tensor':<72} {'dtype':<8} {'shape':<12} {'bytes':>9} {'times':>5}")
    for row in rows:
        print(f"{row['tensor']:<72} {row['dtype']:<8} {str(row['shape']):<12} {row['bytes']:>9} {row['times']:>5}")
    for group, info in summary.items():
        members = [r for r in rows if r["group"] == group]
        interval = f"{info['interval_ms']:.1f} ms" if info["interval_ms"] is not None else "n/a"
        print(f"\n{group}: {len(members)} tensor(s), {sum(r['bytes'] for r in members)} bytes, {info['rounds']} "
              f"rounds, median {interval} from one round's start to the next; median wall time per round:")
        for phase, (ms, seen) in info["phases"].items():
            only_some = f"  (in {seen} of {info['rounds']} rounds)" if seen < info["rounds"] else ""
            print(f"  {phase:<26} {ms:9.3f} ms{only_some}")

if __name__ == "__main__":
    main()
