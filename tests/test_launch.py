"""Launchers: exact dry-run commands for 16 DGX-1 nodes, Horovod's tools, signals and SLURM requeue,
clear errors (one line, rank 0's error last), paths from the caller's directory, real 2-process runs, lint."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import ENV, REPO, TINY_MODEL_FLAGS, last_line, python, run

DGX = "hostfiles/dgx1-16nodes.txt"
BIN = f"{REPO}/.venv/bin"
LAUNCHERS = ["horovodrun.sh", "mpirun.sh", "elastic.sh", "slurm.sbatch"]


def launch(script, *args, cwd=REPO, **kw):
    return run(["bash", f"{REPO}/launch/{script}", *args], cwd=cwd, **kw)


@pytest.mark.cli
def test_horovodrun_dry_run_for_16_dgx1_nodes():
    out = launch("horovodrun.sh", "--hostfile", DGX, "--dry-run", "--flagfile=configs/paper_32k.cfg",
                 check=True).stdout
    assert re.search(r"horovodrun -np 128 -H dgx01:8,dgx02:8,.*,dgx16:8 --stall-check-shutdown-time-seconds 600 "
                     r"\S+python \S+/train.py --flagfile=configs/paper_32k.cfg$", out.strip()), out


@pytest.mark.cli
@pytest.mark.parametrize("script, args", [("horovodrun.sh", ["--hostfile", DGX]), ("mpirun.sh", ["--hostfile", DGX]),
                                          ("slurm.sbatch", [])])
def test_finetune_runs_the_fine_tuning_module_under_every_launcher(script, args):
    out = launch(script, *args, "--dry-run", "--finetune", "--model_dir=runs/x", check=True).stdout.strip()
    assert re.search(r"\S+python -m horovod_mlstm.finetune --model_dir=runs/x$", out) and "train.py" not in out, out


@pytest.mark.cli
def test_elastic_refuses_finetune():
    proc = launch("elastic.sh", "--hostfile", DGX, "--dry-run", "--finetune")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("--finetune does not run elastic: use "
                                                                 "launch/horovodrun.sh --finetune"), proc.stderr


@pytest.mark.cli
def test_mpirun_dry_run_has_horovods_multinode_settings():
    out = launch("mpirun.sh", "--hostfile", DGX, "--iface", "ib0", "--dry-run", "--train_steps=5",
                 check=True).stdout
    for part in ["mpirun -np 128 -hostfile", "dgx1-16nodes.txt", "-bind-to none -map-by slot --tag-output",
                 "-x NCCL_DEBUG=INFO -x LD_LIBRARY_PATH -x PATH", "-mca pml ob1 -mca btl ^openib",
                 "-mca btl_tcp_if_include ib0 -x NCCL_SOCKET_IFNAME=ib0", "train.py --train_steps=5"]:
        assert part in out, part


@pytest.mark.cli
def test_slurm_dry_run_is_128_tasks():
    out = launch("slurm.sbatch", "--dry-run", "--flagfile=configs/paper_32k.cfg", check=True).stdout
    assert out.startswith("env HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=600 srun --ntasks=128 --ntasks-per-node=8 "
                          "--gpus-per-task=1") and "paper_32k.cfg" in out
    assert " --kill-on-bad-exit=1 " in out  # a rank that ends the job on a stall ends every task
    header = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=16" in header and "#SBATCH --ntasks-per-node=8" in header


@pytest.mark.parametrize("hostfile, args, message", [
    ("missing.txt", [], "does not exist"),
    ("bad.txt", [], "bad.txt:2: expected 'host slots=N'"),
    ("good.txt", ["--np", "9"], "--np 9 is more than the 8 slots"),
])
@pytest.mark.cli
@pytest.mark.parametrize("script", ["horovodrun.sh", "mpirun.sh"])
def test_bad_hostfiles_and_too_many_processes(tmp_path, script, hostfile, args, message):
    (tmp_path / "bad.txt").write_text("node1 slots=4\nnode2 slots four\n")
    (tmp_path / "good.txt").write_text("# two nodes\nnode1 slots=4\nnode2 slots=4\n")
    proc = launch(script, "--hostfile", str(tmp_path / hostfile), *args, "--dry-run")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


PAYLOAD = "x;touch${IFS}%s;true"  # a "host name" that a shell would run: ssh x, then touch MARKER


@pytest.mark.cli
@pytest.mark.parametrize("script, hostfile_line", [("horovodrun.sh", "{} slots=1"), ("mpirun.sh", "{} slots=1"),
                                                   ("elastic.sh", "{}:1"), ("elastic.sh", "{} slots=1")])
def test_a_host_name_that_is_shell_code_never_runs(tmp_path, script, hostfile_line):
    """Not a dry run: were the line let through, horovodrun would put it into an ssh command line (it did, before
    host lists were checked). Every launcher stops at the line instead, with one line naming file:line."""
    marker = tmp_path / "pwned"
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# the cluster\n" + hostfile_line.format("localhost") + "\n"
                        + hostfile_line.format(PAYLOAD % marker) + "\n")
    proc = launch(script, "--hostfile", str(hostfile), "--iface", "lo", "--np", "1", "--train_steps=1",
                  cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{hostfile}:3: expected " in proc.stderr and "a host name is letters, digits" in proc.stderr
    assert not marker.exists()


@pytest.mark.cli
def test_a_discovery_scripts_output_is_checked_at_start_and_every_time_horovodrun_asks(tmp_path):
    """elastic.sh --discovery S: horovodrun runs hostfiles/discover_hosts.sh, which runs S and passes its lines on
    only when every one is a plain "host:N"; a bad one prints nothing and one line (horovodrun then keeps the hosts
    it has), and elastic.sh refuses to start on it."""
    marker = tmp_path / "pwned"
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\necho localhost:1\necho '{PAYLOAD % marker}:1'\n")
    script.chmod(0o755)
    proc = launch("elastic.sh", "--discovery", str(script), "--iface", "lo", "--train_steps=1", cwd=tmp_path,
                  timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"discovery script {script}, line 2 of its output: expected 'host:N', got" in proc.stderr
    discovered = run([f"{REPO}/hostfiles/discover_hosts.sh"], env={"HOROVOD_MLSTM_DISCOVERY": str(script)})
    assert discovered.returncode == 1 and discovered.stdout == "" and discovered.stderr.count("\n") == 1
    assert not marker.exists()
    script.write_text("#!/bin/sh\necho localhost:1\necho node-2.example_b:4\n")
    discovered = run([f"{REPO}/hostfiles/discover_hosts.sh"], env={"HOROVOD_MLSTM_DISCOVERY": str(script)})
    assert discovered.returncode == 0 and discovered.stdout == "localhost:1\nnode-2.example_b:4\n"
    dry = launch("elastic.sh", "--discovery", str(script), "--dry-run", check=True).stdout
    assert dry.startswith(f"env HOROVOD_MLSTM_DISCOVERY={script} ") and "hostfiles/discover_hosts.sh" in dry
    script.write_text("#!/bin/sh\necho 'no scheduler here' >&2\nexit 3\n")
    failed = launch("elastic.sh", "--discovery", str(script), "--dry-run")
    assert failed.returncode == 2 and failed.stderr == (f"discover_hosts.sh: discovery script {script} failed "
                                                        "(status 3): no scheduler here\n")


@pytest.mark.cli
@pytest.mark.parametrize("line", ["-oProxyCommand slots=1", ".hidden slots=1", "node1 slots=0", "node1:1",
                                  "node1 slots=2 extra", "nöde slots=1", "node$(id) slots=1"])
def test_static_hostfile_lines_that_are_not_plain_host_names(tmp_path, line):
    (tmp_path / "hosts.txt").write_text(f"{line}\n")
    proc = launch("horovodrun.sh", "--hostfile", str(tmp_path / "hosts.txt"), "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and ":1: expected 'host slots=N'" in proc.stderr


@pytest.mark.multiproc
@pytest.mark.parametrize("script", ["horovodrun.sh", "mpirun.sh"])
def test_launchers_really_train_two_processes_with_paths_from_the_callers_directory(tmp_path, tiny_data, script):
    """Relative --flagfile, --data_dir, --model_dir and --timeline resolve against where the launcher is run,
    not the repository; the timeline (a horovodrun flag or mpirun's HOROVOD_TIMELINE) has each step's allreduce."""
    from horovod_mlstm import timeline
    from horovod_mlstm.inference import load_trained_model

    steps = 3
    (tmp_path / "tiny.cfg").write_text("\n".join([*TINY_MODEL_FLAGS, f"--train_steps={steps}", "--warmup_steps=1"]))
    launch(script, "--hostfile", f"{REPO}/hostfiles/localhost.txt", "--timeline", "tl.json", "--flagfile=tiny.cfg",
           "--model_dir=run", f"--data_dir={os.path.relpath(tiny_data, tmp_path)}", cwd=tmp_path, check=True,
           timeout=300)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == steps and summary["replicas_in_sync"]
    assert not (REPO / "run").exists() and not (REPO / "tl.json").exists()

    assert json.loads((tmp_path / "tl.json").read_text())  # strict JSON, as chrome://tracing and Perfetto read it
    rows, groups = timeline.summarize(timeline.load_spans(str(tmp_path / "tl.json")))
    gradients = [group for group in groups if group.startswith("HorovodGroupedAllreduce")]
    assert len(gradients) == 1 and groups[gradients[0]]["rounds"] == steps, groups
    model = load_trained_model(str(tmp_path / "run"))
    assert sum(r["bytes"] for r in rows if r["group"] == gradients[0]) == 4 * model.count_params()
    phases = groups[gradients[0]]["phases"]
    assert phases["NEGOTIATE_ALLREDUCE"][0] > 0 and phases["ALLREDUCE"][0] > 0
    assert groups[gradients[0]]["interval_ms"] > 0
    out = python("-m", "horovod_mlstm.timeline", str(tmp_path / "tl.json"), check=True).stdout
    assert f"{steps} rounds, median" in out and "NEGOTIATE_ALLREDUCE" in out


@pytest.mark.multiproc
@pytest.mark.parametrize("script", ["horovodrun.sh", "mpirun.sh"])
def test_a_failed_job_ends_with_rank_0s_error_line(tmp_path, script):
    proc = launch(script, "--np", "2", "--batch_size_per_worker=0", f"--model_dir={tmp_path}/run", timeout=300)
    assert proc.returncode != 0
    assert last_line(proc.stderr) == "error: --batch_size_per_worker must be at least 1, got 0", proc.stderr[-2000:]


@pytest.fixture
def elastic_hosts(tmp_path):
    """Two hosts for elastic.sh's discovery; the other launchers ignore the variable."""
    (tmp_path / "hosts.txt").write_text("node1:2\nnode2:2\n")
    return {"HOROVOD_MLSTM_ELASTIC_HOSTS": str(tmp_path / "hosts.txt")}


# launcher options -> horovodrun's flags, and the variables Horovod reads under mpirun/srun ({d}: the caller's dir);
# the stall shutdown is there by default (600 s), and a shutdown time of 60 s or less brings the warning time down
DEFAULT_STALL = ("--stall-check-shutdown-time-seconds 600", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=600")
TOOLS = [
    (["--timeline", "tl.json"], "--timeline-filename {d}/tl.json " + DEFAULT_STALL[0],
     ["HOROVOD_TIMELINE={d}/tl.json", DEFAULT_STALL[1]]),
    (["--autotune", "--autotune_log=tune.csv"], "--autotune --autotune-log-file {d}/tune.csv " + DEFAULT_STALL[0],
     ["HOROVOD_AUTOTUNE=1", "HOROVOD_AUTOTUNE_LOG={d}/tune.csv", DEFAULT_STALL[1]]),
    (["--stall_check_warning_seconds", "30", "--stall_check_shutdown_seconds=90"],
     "--stall-check-warning-time-seconds 30 --stall-check-shutdown-time-seconds 90",
     ["HOROVOD_STALL_CHECK_TIME_SECONDS=30", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=90"]),
    (["--stall_check_shutdown_seconds=20"], "--stall-check-warning-time-seconds 10 --stall-check-shutdown-time-seconds 20",
     ["HOROVOD_STALL_CHECK_TIME_SECONDS=10", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=20"]),
    (["--no_stall_check"], "--no-stall-check", ["HOROVOD_STALL_CHECK_DISABLE=1"]),
]


@pytest.mark.multiproc
@pytest.mark.parametrize("options, flags, variables", TOOLS, ids=lambda x: x[0] if isinstance(x, list) else "")
@pytest.mark.parametrize("script", LAUNCHERS)
def test_horovod_tools_reach_the_ranks_as_horovod_documents(tmp_path, elastic_hosts, script, options, flags,
                                                           variables):
    out = launch(script, *options, "--dry-run", "--train_steps=5", cwd=tmp_path, env=elastic_hosts,
                 check=True).stdout.strip()
    flags, variables = flags.format(d=tmp_path), [v.format(d=tmp_path) for v in variables]
    if script in ("horovodrun.sh", "elastic.sh"):
        assert re.search(re.escape(flags) + r" \S+/python \S+/train.py (--elastic )?--train_steps=5$", out), out
    elif script == "mpirun.sh":
        assert " ".join(f"-x {v}" for v in variables) + " " in out and "HOROVOD_" not in out.split("train.py")[1]
    else:
        assert out.startswith(f"env {' '.join(variables)} srun --ntasks=128"), out


@pytest.mark.cli
def test_tool_names_are_horovods_own():
    """The flags and variables above are the ones the installed horovodrun defines (not guessed)."""
    from horovod.runner.common.util import config_parser

    for *_, variables in TOOLS:
        for name in (v.split("=")[0] for v in variables):
            assert getattr(config_parser, name) == name
    help_text = run([f"{BIN}/horovodrun", "--help"], check=True).stdout
    for _, flags, _ in TOOLS:
        for flag in re.findall(r"--[a-z-]+", flags):
            assert re.search(rf"^\s+{flag}\b", help_text, re.M), flag


@pytest.mark.parametrize("args, message", [
    (["--np", "0"], "--np must be a positive whole number, got '0'"),
    (["--np=abc"], "--np must be a positive whole number, got 'abc'"),
    (["--stall_check_warning_seconds", "abc"], "--stall_check_warning_seconds must be a positive whole number"),
    (["--stall_check_warning_seconds=60", "--stall_check_shutdown_seconds=30"],
     "--stall_check_shutdown_seconds (30) must exceed --stall_check_warning_seconds (60)"),
    (["--stall_check_warning_seconds=700"],
     "--stall_check_shutdown_seconds (600, the default) must exceed --stall_check_warning_seconds (700)"),
    (["--autotune_log", "tune.csv"], "--autotune_log needs --autotune"),
    (["--no_stall_check", "--stall_check_warning_seconds=5"], "--no_stall_check contradicts"),
    (["--timeline", "missing/tl.json"], "/missing/tl.json: directory "),
    (["--flagfile=missing.cfg"], "flagfile missing.cfg not found in"),
])
@pytest.mark.cli
@pytest.mark.parametrize("script", LAUNCHERS)
def test_bad_launcher_settings_are_one_line(tmp_path, elastic_hosts, script, args, message):
    proc = launch(script, *args, "--dry-run", cwd=tmp_path, env=elastic_hosts)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


VALUE_OPTIONS = ["--hostfile", "--np", "--iface", "--timeline", "--autotune_log", "--stall_check_warning_seconds",
                 "--stall_check_shutdown_seconds"]


@pytest.mark.cli
@pytest.mark.parametrize("script, option", [(s, o) for s in LAUNCHERS for o in VALUE_OPTIONS]
                         + [("elastic.sh", o) for o in ["--min-np", "--max-np", "--discovery"]])
def test_an_option_without_its_value_is_one_line(elastic_hosts, script, option):
    for args in ([option], [f"{option}="]):
        proc = launch(script, "--dry-run", "--train_steps=5", *args, env=elastic_hosts)
        assert proc.returncode == 2 and proc.stderr.strip() == f"{script}: {option} needs a value", proc.stderr


@pytest.mark.cli
@pytest.mark.parametrize("script", ["mpirun.sh", "elastic.sh", "slurm.sbatch"])
def test_controller_choice_belongs_to_horovodrun_sh(elastic_hosts, script):
    proc = launch(script, "--gloo", "--dry-run", env=elastic_hosts)
    assert proc.returncode == 2 and "--gloo applies to launch/horovodrun.sh only" in proc.stderr
    assert "--gloo" in launch("horovodrun.sh", "--gloo", "--dry-run", check=True).stdout


@pytest.mark.cli
def test_slurm_refuses_a_hostfile():
    proc = launch("slurm.sbatch", "--hostfile", "hostfiles/localhost.txt", "--dry-run")
    assert proc.returncode == 2 and "--hostfile does not apply" in proc.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun: records its arguments and the signals it gets (then exits 75, as train.py does);
# without a signal it exits $FAKE_SRUN_STATUS, or waits when that is unset.
echo "$*" > "$FAKE_DIR/srun.args"
for sig in TERM USR1; do trap "echo $sig >> '$FAKE_DIR/srun.signals'; kill \\$!; exit 75" $sig; done
touch "$FAKE_DIR/srun.started"
[ -z "${FAKE_SRUN_STATUS:-}" ] || exit "$FAKE_SRUN_STATUS"
sleep 60 & wait
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """`srun` and `scontrol` stand-ins first on PATH (SLURM is not installed here), inside job 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE_DIR/scontrol.args"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "4242"}


def wait_for(path, proc, timeout=60):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {path.name}: {proc.communicate()}"
        assert time.time() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_slurm_passes_the_signal_to_srun_and_requeues_on_75(tmp_path, fake_slurm, sig):
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", "--np", "2", "--train_steps=5"], cwd=REPO,
                            env={**ENV, **fake_slurm}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "srun.started", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert (tmp_path / "srun.signals").read_text().split() == [sig.name.removeprefix("SIG")]
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in last_line(err)
    assert "--ntasks=2" in (tmp_path / "srun.args").read_text()
    header = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header


@pytest.mark.cli
@pytest.mark.parametrize("status", [0, 3])
def test_slurm_passes_other_statuses_through_without_requeue(tmp_path, fake_slurm, status):
    proc = launch("slurm.sbatch", "--np", "2", env={**fake_slurm, "FAKE_SRUN_STATUS": str(status)})
    assert proc.returncode == status and not (tmp_path / "scontrol.args").exists()


@pytest.mark.cli
def test_slurm_outside_an_allocation_says_so():
    proc = launch("slurm.sbatch", "--np", "2", env={"SLURM_JOB_ID": ""})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not inside a SLURM allocation" in proc.stderr
    proc = launch("slurm.sbatch", "--np", "2", env={"SLURM_JOB_ID": "7", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "srun is not on PATH" in proc.stderr


@pytest.mark.cli
def test_mpirun_missing_is_one_line(tmp_path):
    """Only the tools the script itself needs are on PATH: mpirun is not."""
    for tool in ["bash", "dirname", "basename", "hostname", "id"]:
        (tmp_path / tool).symlink_to(shutil.which(tool))
    proc = launch("mpirun.sh", "--np", "2", env={"PATH": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "mpirun is not on PATH" in proc.stderr


@pytest.fixture
def standin_tree(tmp_path):
    """A copy of the launchers whose train.py is tests/standin_train.py (they run ROOT/train.py)."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "launch", tree / "launch")
    shutil.copytree(REPO / "hostfiles", tree / "hostfiles")
    (tree / ".venv").symlink_to(REPO / ".venv")
    shutil.copy(REPO / "tests" / "standin_train.py", tree / "train.py")
    return tree


@pytest.mark.multiproc
@pytest.mark.parametrize("script, controller, received", [
    ("horovodrun.sh", "--gloo", "SIGTERM"),  # the launcher sends it to the ranks itself, not to horovodrun
    ("horovodrun.sh", "--mpi", "SIGUSR1"),  # it becomes mpirun, which would kill the ranks on SIGTERM
    ("mpirun.sh", None, "SIGUSR1"),
    ("elastic.sh", None, "SIGTERM"),  # horovodrun+Gloo in elastic mode
])
def test_a_signal_to_the_launcher_reaches_every_rank_and_75_comes_back(tmp_path, standin_tree, script, controller,
                                                                      received):
    records = tmp_path / "records"
    records.mkdir()
    (tmp_path / "hosts.txt").write_text("localhost:1\n127.0.0.1:1\n")  # elastic.sh: two local "hosts"
    hosts = ["--hostfile", str(tmp_path / "hosts.txt")] if script == "elastic.sh" else []
    cmd = ["bash", f"{standin_tree}/launch/{script}", *([controller] if controller else []), *hosts, "--np", "2",
           f"--record_dir={records}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for rank in (0, 1):
        wait_for(records / f"rank{rank}.started", proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    # The first signal each rank got (horovodrun may SIGTERM a rank still exiting when its peer has exited 75).
    assert [(records / f"rank{rank}.signals").read_text().split()[0] for rank in (0, 1)] == [received] * 2
    assert last_line(err).endswith("training stopped at a checkpoint (status 75); the same command resumes it")
    assert out.count("[train] stopped at step 7") == 2


def start_standin(standin_tree, records, script, *flags, env=None):
    """horovodrun.sh --gloo, or elastic.sh on two local "hosts", with 2 stand-in ranks, once both have started."""
    (records / "hosts.txt").write_text("localhost:1\n127.0.0.1:1\n")
    launcher = ["--gloo"] if script == "horovodrun.sh" else ["--hostfile", str(records / "hosts.txt")]
    cmd = ["bash", f"{standin_tree}/launch/{script}", *launcher, "--np", "2", f"--record_dir={records}", *flags]
    proc = subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for rank in (0, 1):
        wait_for(records / f"rank{rank}.started", proc, timeout=120)
    return proc


@pytest.mark.multiproc
@pytest.mark.parametrize("script", ["horovodrun.sh", "elastic.sh"])
def test_a_stop_longer_than_horovodruns_5_s_grace_still_ends_75(tmp_path, standin_tree, script):
    """horovodrun SIGKILLs its ranks 5 s after its own SIGTERM (elastic mode too): the launcher signals the
    ranks instead. COLUMNS=20 would cut ps's command lines short of the ranks' own, were it not for ps -ww."""
    proc = start_standin(standin_tree, tmp_path, script, "--stop_seconds=8", env={"COLUMNS": "20"})
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:] + err[-2000:]
    assert time.time() - started >= 8 and out.count("[train] stopped at step 7") == 2
    assert "passing SIGTERM to the ranks on this host" in err


@pytest.mark.multiproc
def test_a_second_signal_goes_to_horovodrun_which_ends_a_stop_that_hangs(tmp_path, standin_tree):
    proc = start_standin(standin_tree, tmp_path, "horovodrun.sh", "--stop_seconds=600")
    proc.send_signal(signal.SIGTERM)
    for rank in (0, 1):
        wait_for(tmp_path / f"rank{rank}.signals", proc)
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 75) and time.time() - started < 60, out[-2000:] + err[-2000:]
    assert "got SIGTERM, passing SIGTERM to the job" in err


@pytest.mark.multiproc
def test_a_0_from_horovodrun_after_it_was_terminated_is_not_success(tmp_path, standin_tree):
    """horovodrun can report a rank it terminated as status 0 (two threads reap the rank's shell; see
    common.sh run_job). A stand-in horovodrun that does just that, with no rank to signal directly."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(f"{BIN}/python")
    (venv / "bin" / "horovodrun").write_text(
        "#!/bin/bash\ntrap 'kill $!; exit 0' TERM\ntouch \"$RECORDS/runner.started\"\nsleep 60 & wait\n")
    (venv / "bin" / "horovodrun").chmod(0o755)
    (standin_tree / ".venv").unlink()
    (standin_tree / ".venv").symlink_to(venv)
    proc = subprocess.Popen(["bash", f"{standin_tree}/launch/horovodrun.sh", "--gloo", "--np", "2"],
                            env={**ENV, "RECORDS": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(tmp_path / "runner.started", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "passing SIGTERM to the job" in err
    assert last_line(err).endswith("horovodrun said 0 after it terminated the ranks, which is not a finished job; "
                                   "exiting 143 (the same command resumes from the last checkpoint)")


@pytest.mark.cli
@pytest.mark.parametrize("text, message", [
    ("[{", "not a readable Horovod timeline"),
    ("{}", "expected a JSON list of trace events"),
    ('[{"ph": "B", "name": "ALLREDUCE"}]', "a trace event lacks 'pid'"),
    ("[]", "the timeline has no allreduce"),
])
def test_timeline_summary_refuses_a_file_that_is_not_a_timeline(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    bad = python("-m", "horovod_mlstm.timeline", str(tmp_path / "bad.json"))
    assert bad.returncode == 1 and last_line(bad.stderr).startswith(f"error: {tmp_path}/bad.json: ")
    assert message in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1


@pytest.mark.cli
def test_lint_scripts_and_dockerfile():
    run([f"{BIN}/shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, sorted((REPO / "launch").glob("*.sh"))),
         *map(str, sorted((REPO / "scripts").glob("*.sh"))), "launch/slurm.sbatch", "hostfiles/discover_hosts.sh",
         ".ci/run"], check=True)
    run([f"{BIN}/hadolint", "Dockerfile"], check=True)


@pytest.mark.unit
def test_dockerfile_pins_the_stack_and_orders_layers():
    text = (REPO / "Dockerfile").read_text()
    steps = (REPO / "scripts" / "image.sh").read_text()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert ":" in base and not base.endswith(":latest")
    assert "horovod==0.28.1" in steps and "HOROVOD_GPU_OPERATIONS=NCCL" in steps and "tensorflow==" in steps
    assert "python3.11" in steps and "HOROVOD_WITH_MPI=1" in steps and "HOROVOD_WITH_GLOO=1" in steps
    # requirements and Horovod come before the code, so a code change does not rebuild Horovod;
    # the final stage copies the built venv, never the wheelhouse or the compilers
    assert (text.index("COPY requirements.txt") < text.index("image.sh horovod")
            < text.index("COPY --from=build /opt/venv") < text.index("COPY horovod_mlstm/"))
    assert "COPY . ." not in text and text.count("COPY wheelhouse/") == 1
    # pip goes offline exactly when the wheelhouse holds wheels
    assert "PIP_NO_INDEX=1" in steps and "/wheelhouse/*.whl" in steps
    assert "tensorflow-cpu==2.15.1" in (REPO / "requirements.txt").read_text()


def fake_commands(tmp_path, **scripts):
    """A bin directory of stand-in executables, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    os.chmod(tmp_path, 0o755)
    return {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}"}


@pytest.mark.cli
def test_docker_daemon_without_permission_is_one_line(tmp_path):
    # docker 20.10 prints this on stdout, newer clients on stderr: the script must see both
    env = fake_commands(tmp_path, docker="echo 'ERROR: Got permission denied while trying to connect to the Docker "
                                         "daemon socket at unix:///var/run/docker.sock'; exit 1")
    proc = run(["bash", "scripts/docker.sh", "daemon"], cwd=REPO, env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("[docker] error: no permission to use the Docker daemon")


@pytest.mark.cli
def test_docker_daemon_that_cannot_start_names_the_cause(tmp_path):
    env = fake_commands(tmp_path, docker="echo 'Cannot connect to the Docker daemon' >&2; exit 1",
                        dockerd="echo 'level=fatal msg=\"failed to start daemon: iptables not found\"'; exit 1")
    proc = run(["bash", "scripts/docker.sh", "daemon"], cwd=REPO, env={**env, "DOCKERD_LOG": str(tmp_path / "d.log")})
    assert proc.returncode == 1 and last_line(proc.stderr).startswith("[docker] error: dockerd did not start: ")
    assert "iptables not found" in proc.stderr and proc.stderr.count("error") == 1, proc.stderr


@pytest.mark.cli
@pytest.mark.needs_root
def test_docker_daemon_not_running_without_root_is_one_line():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the script as another user")
    public = pathlib.Path(tempfile.mkdtemp(prefix="docker-fakes-"))  # pytest's tmp_path is private to root
    try:
        env = fake_commands(public, docker="echo 'Cannot connect to the Docker daemon' >&2; exit 1", dockerd="exit 0")
        proc = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "scripts/docker.sh",
                    "daemon"], cwd=REPO, env={**env, "HOME": str(public)})
    finally:
        shutil.rmtree(public)
    assert proc.returncode == 1 and proc.stderr == "[docker] error: dockerd is not running and starting it needs root\n"


def rank_pids(rank: int, marker: str) -> list[int]:
    """The train.py processes of `rank` (horovodrun's HOROVOD_RANK or Open MPI's rank) whose command line has `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train.py" in cmdline and marker.encode() in cmdline and (
                f"HOROVOD_RANK={rank}".encode() in environ or f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ):
            found.append(int(pid))
    return found


@pytest.mark.multiproc
@pytest.mark.parametrize("controller", ["--mpi", "--gloo"])
def test_a_frozen_rank_ends_the_job_with_one_line_naming_it(tmp_path, tiny_data, controller):
    """kill -STOP rank 1 of a 2-rank job: Horovod's stall check alone never ends it (MPI waits forever, silently),
    the ranks' heartbeat watch does, after the stall shutdown time; the last line names rank 1, and the last
    checkpoint resumes."""
    model_dir = tmp_path / "run"
    flags = [*TINY_MODEL_FLAGS, "--lr_decay=constant", "--train_steps=100000", "--checkpoint_every=10",
             f"--data_dir={tiny_data}", f"--model_dir={model_dir}"]
    out, err = (tmp_path / "out.txt").open("w+"), (tmp_path / "err.txt").open("w+")
    proc = subprocess.Popen(["bash", f"{REPO}/launch/horovodrun.sh", controller, "--np", "2",
                             "--stall_check_shutdown_seconds=10", *flags], env=ENV, stdout=out, stderr=err)
    frozen = []
    try:
        deadline = time.time() + 300
        while "[train] step 25/" not in (tmp_path / "out.txt").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.2)
        frozen = rank_pids(1, str(model_dir))
        assert len(frozen) == 1, frozen
        os.kill(frozen[0], signal.SIGSTOP)
        stopped = time.time()
        status = proc.wait(timeout=120)
        ended_after = time.time() - stopped
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "err.txt").read_text()
    assert status not in (0, 75), stderr[-3000:]
    assert re.fullmatch(r"error: rank 1 stalled: its heartbeat stopped and no step has finished for \d+ s "
                        r"\(last step \d+\); ending the job \(stall shutdown after 10 s\)", last_line(stderr)), stderr[-3000:]
    print(f"\n[stall] {controller}: SIGSTOP of rank 1 to the launcher's exit {ended_after:.1f} s, status {status}")
    assert ended_after < 60
    last = int(re.findall(r"checkpoint \S+/ckpt-(\d+)", stderr)[-1])
    rerun = python("train.py", *flags, "--batch_size_per_worker=8", f"--train_steps={last + 2}", check=True)
    assert f"ckpt-{last} at step {last}" in rerun.stdout, rerun.stdout


# What Horovod 0.28.1 prints when its stall check shuts a job down (here under mpirun's --tag-output), and the
# heartbeat watch's line from rank 1 when rank 0 is the frozen one (horovodrun+Gloo's tag).
HOROVOD_STALL_SHUTDOWN = """[1,0]<stderr>:Missing ranks:
[1,0]<stderr>:1: [HorovodAllreduce][1,0]<stderr>:
[1,0]<stderr>:Missing ranks:
[1,0]<stderr>:1!: [HorovodAllreduce]
[1,0]<stderr>:3!: [HorovodAllreduce_grads_0]
[1,0]<stderr>:One or more rank (marked by "!") is stalled for longer than 15 seconds. Will shutdown.[1,0]<stderr>:
[1,0]<stderr>:error: Horovod shut the job down (a rank stalled past the stall shutdown time, left or failed)
"""


@pytest.mark.cli
@pytest.mark.parametrize("log, line", [
    (HOROVOD_STALL_SHUTDOWN, "error: ranks 1, 3 stalled: Horovod's stall check found them missing from a collective "
                             "past the stall shutdown time and shut the job down"),
    ("0: error: rank 2 stalled: its heartbeat stopped\n1: error: later\n", "error: rank 2 stalled: its heartbeat stopped"),
    ("[1]<stderr>:error: rank 0 stalled: its heartbeat stopped\n", "error: rank 0 stalled: its heartbeat stopped"),
    ("[1,1]<stderr>:error: one\n[1,0]<stderr>:error: zero[1,0]<stderr>:\n", "error: zero"),
])
def test_the_last_line_of_a_failed_job(tmp_path, log, line):
    (tmp_path / "stderr.txt").write_text(log)
    proc = run(["bash", "-c", f'source "{REPO}/launch/common.sh" && job_error "$1"', "bash", str(tmp_path / "stderr.txt")],
               check=True)
    assert proc.stdout == line + "\n"


@pytest.mark.unit
def test_the_stall_watch_names_the_peer_whose_heartbeat_stopped(tmp_path):
    from horovod_mlstm import stallwatch

    assert stallwatch.shutdown_seconds({"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30"}) == 30
    assert stallwatch.shutdown_seconds({"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30",
                                        "HOROVOD_STALL_CHECK_DISABLE": "1"}) == 0
    assert stallwatch.shutdown_seconds({}) == 0
    ended = []
    watch = stallwatch.StallWatch(str(tmp_path), rank=0, world=3, seconds=1)
    watch._end = ended.append  # the real one ends the process
    watch.start()
    watch.progress(7)
    deadline = time.time() + 30
    try:
        while not ended and time.time() < deadline:  # rank 1 beats, rank 2 never does
            (tmp_path / "heartbeats" / "rank-1").write_text(str(time.time()))
            time.sleep(0.2)
    finally:
        watch.stop()
    assert ended and re.fullmatch(r"rank 2 stalled: its heartbeat stopped and no step has finished for \d+ s "
                                  r"\(last step 7\); ending the job \(stall shutdown after 1 s\)", ended[0]), ended
    assert (tmp_path / "heartbeats" / "rank-0").read_text().split()[2] == "7"
