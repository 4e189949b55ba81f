"""Launchers: exact dry-run commands for 16 DGX-1 nodes, clear errors, real 2-process runs, lint."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO, TINY_MODEL_FLAGS, run

DGX = "hostfiles/dgx1-16nodes.txt"
BIN = f"{REPO}/.venv/bin"


def launch(script, *args, **kw):
    return run(["bash", f"launch/{script}", *args], **kw)


def test_horovodrun_dry_run_for_16_dgx1_nodes():
    out = launch("horovodrun.sh", "--hostfile", DGX, "--dry-run", "--flagfile=configs/paper_32k.cfg",
                 check=True).stdout
    assert re.search(r"horovodrun -np 128 -H dgx01:8,dgx02:8,.*,dgx16:8 \S+python \S+/train.py "
                     r"--flagfile=configs/paper_32k.cfg$", out.strip()), out


def test_mpirun_dry_run_has_horovods_multinode_settings():
    out = launch("mpirun.sh", "--hostfile", DGX, "--iface", "ib0", "--dry-run", "--train_steps=5",
                 check=True).stdout
    for part in ["mpirun -np 128 -hostfile", "dgx1-16nodes.txt", "-bind-to none -map-by slot",
                 "-x NCCL_DEBUG=INFO -x LD_LIBRARY_PATH -x PATH", "-mca pml ob1 -mca btl ^openib",
                 "-mca btl_tcp_if_include ib0 -x NCCL_SOCKET_IFNAME=ib0", "train.py --train_steps=5"]:
        assert part in out, part


def test_slurm_dry_run_is_128_tasks():
    out = launch("slurm.sbatch", "--dry-run", "--flagfile=configs/paper_32k.cfg", check=True).stdout
    assert "srun --ntasks=128 --ntasks-per-node=8 --gpus-per-task=1" in out and "paper_32k.cfg" in out
    header = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=16" in header and "#SBATCH --ntasks-per-node=8" in header


@pytest.mark.parametrize("hostfile, args, message", [
    ("missing.txt", [], "does not exist"),
    ("bad.txt", [], "bad.txt:2: expected 'host slots=N'"),
    ("good.txt", ["--np", "9"], "--np 9 is more than the 8 slots"),
])
@pytest.mark.parametrize("script", ["horovodrun.sh", "mpirun.sh"])
def test_bad_hostfiles_and_too_many_processes(tmp_path, script, hostfile, args, message):
    (tmp_path / "bad.txt").write_text("node1 slots=4\nnode2 slots four\n")
    (tmp_path / "good.txt").write_text("# two nodes\nnode1 slots=4\nnode2 slots=4\n")
    proc = launch(script, "--hostfile", str(tmp_path / hostfile), *args, "--dry-run")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


@pytest.mark.parametrize("script", ["horovodrun.sh", "mpirun.sh"])
def test_launchers_really_train_two_processes(tmp_path, tiny_data, script):
    model_dir = tmp_path / "run"
    launch(script, "--hostfile", "hostfiles/localhost.txt", *TINY_MODEL_FLAGS, "--train_steps=3",
           "--warmup_steps=1", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", check=True, timeout=300)
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 3 and summary["replicas_in_sync"]


def test_lint_scripts_and_dockerfile():
    run([f"{BIN}/shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, sorted((REPO / "launch").glob("*.sh"))),
         "launch/slurm.sbatch", "hostfiles/discover_hosts.sh", "scripts/setup.sh", ".ci/run"], check=True)
    run([f"{BIN}/hadolint", "Dockerfile"], check=True)


def test_dockerfile_pins_the_stack_and_orders_layers():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert ":" in base and not base.endswith(":latest")
    assert "horovod==0.28.1" in text and "HOROVOD_GPU_OPERATIONS=NCCL" in text and "tensorflow==" in text
    assert "python3.11" in text and "HOROVOD_WITH_MPI=1" in text and "HOROVOD_WITH_GLOO=1" in text
    # requirements and Horovod come before the code, so a code change does not rebuild Horovod
    assert text.index("COPY requirements.txt") < text.index("horovod==0.28.1") < text.index("COPY . .")
    assert 'ENTRYPOINT ["horovodrun"]' in text
    # the image and `make setup` install the same requirements.txt, so their versions agree
    assert "tensorflow-cpu==2.15.1" in (REPO / "requirements.txt").read_text()
