"""Stand-in for train.py in the launcher signal tests (tests/test_launch.py), not part of the project.

It keeps train.py's contract with the launchers without TensorFlow: each rank records the signals it gets
(SIGTERM or SIGUSR1) in --record_dir, takes --stop_seconds (the checkpoint), then exits 75 after one
"[train] stopped at step" line, as train.py does; left alone it finishes with status 0 after --seconds.
"""

import os
import signal
import sys
import time


def main():
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in sys.argv[1:])  # --elastic -> ""
    rank = os.environ.get("HOROVOD_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID")
    record = os.path.join(args["record_dir"], f"rank{rank}")

    stopping = []

    def stop(signum, _frame):
        with open(record + ".signals", "a") as f:
            f.write(signal.Signals(signum).name + "\n")
        if stopping:
            return  # a later signal is recorded; the first one's stop goes on
        stopping.append(signum)
        time.sleep(float(args.get("stop_seconds", "0")))
        print("[train] stopped at step 7 (signal); run the same command to resume", flush=True)
        sys.exit(75)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, stop)
    open(record + ".started", "w").close()
    time.sleep(float(args.get("seconds", "60")))


if __name__ == "__main__":
    main()
