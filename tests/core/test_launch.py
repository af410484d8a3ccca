"""pipeline.core.launch: make's GPUS, NODES, NODE_RANK and MASTER checked before anything starts, then the
command as one process or torchrun."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.core.config import ConfigError
from pipeline.core.launch import command, main

REST = ["-m", "pipeline.train", "--folds", "0"]
RUN = [sys.executable, "-m", "torch.distributed.run"]


def test_one_process_one_machine_several_machines():
    assert command("1", "1", "0", "127.0.0.1:29500", REST) == [sys.executable, *REST]
    assert command("4", "1", "0", "127.0.0.1:29500", REST) == [
        *RUN,
        "--standalone",
        "--nproc_per_node=4",
        *REST,
    ]
    two = command("8", "2", "1", "node0:29500", REST)
    assert two == [
        *RUN,
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=node0",
        "--master_port=29500",
        "--nproc_per_node=8",
        *REST,
    ]


@pytest.mark.parametrize(
    "gpus, nodes, rank, master, message",
    [
        ("0", "1", "0", "h:1", r"GPUS='0': the processes per machine, one per GPU, an integer >= 1"),
        ("two", "1", "0", "h:1", r"GPUS='two'"),
        ("1", "x", "0", "h:1", r"NODES='x': the machines of the job"),
        ("1", "2", "5", "h:1", r"NODE_RANK='5' with NODES=2: give each machine its own rank, 0..1"),
        ("1", "2", "-1", "h:1", r"NODE_RANK='-1'"),
        (
            "1",
            "2",
            "0",
            "node0",
            r"MASTER='node0': give the first machine as host:port, e.g. MASTER=node0:29500",
        ),
        ("1", "2", "0", "node0:port", r"MASTER='node0:port'"),
    ],
)
def test_settings_that_cannot_start_are_refused(gpus, nodes, rank, master, message):
    """NODES=2 NODE_RANK=5 used to wait forever, silently; GPUS=0 and a MASTER without a port to end in a
    torchrun traceback."""
    with pytest.raises(ConfigError, match=message):
        command(gpus, nodes, rank, master, REST)


def test_make_train_with_a_bad_node_rank_is_one_line_and_exit_2():
    done = subprocess.run(
        # -o: never (re)install the environment for this
        [
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed",
            "train",
            "NODES=2",
            "NODE_RANK=5",
            "PY=" + sys.executable,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "error: NODE_RANK='5' with NODES=2" in done.stderr
    assert "Traceback" not in done.stderr


def test_nothing_to_launch(capsys):
    assert main(["--gpus", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: nothing to launch")
