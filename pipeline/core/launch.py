"""`make train` and `make predict-scenes` as one process, `GPUS` processes, or on `NODES` machines.

    python -m pipeline.core.launch --gpus N --nodes M --node-rank k --master host:port -- -m MODULE ...

The Makefile's ``GPUS``, ``NODES``, ``NODE_RANK`` and ``MASTER`` are checked here first: a node rank of
2 on a 2-machine job would wait forever for machines that never come, a ``MASTER`` without a port
would fail inside torchrun with a traceback. Then the process becomes the command itself (one process)
or torchrun (``torch.distributed.run``): on one machine ``--standalone``, on several its static
rendezvous at ``MASTER`` (node 0 holds global rank 0, which writes the run folder).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.core.config import ConfigError
from pipeline.core.errors import cli


def _count(name: str, value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{name}={value!r}: {what}, an integer >= 1 (e.g. {name}=1)")
    return n


def command(gpus: str, nodes: str, node_rank: str, master: str, rest: Sequence[str]) -> list[str]:
    """The command line to run ``rest`` (e.g. ``-m pipeline.train ...``) as asked; raises ConfigError
    naming the setting and a valid value for anything that cannot start."""
    n_gpus = _count("GPUS", gpus, "the processes per machine, one per GPU")
    n_nodes = _count("NODES", nodes, "the machines of the job")
    try:
        rank = int(node_rank)
    except ValueError:
        rank = -1
    if not 0 <= rank < n_nodes:
        raise ConfigError(
            f"NODE_RANK={node_rank!r} with NODES={n_nodes}: give each machine its own rank, 0..{n_nodes - 1} "
            "(the machine at MASTER is 0)"
        )
    if n_gpus == 1 and n_nodes == 1:
        return [sys.executable, *rest]
    run = [sys.executable, "-m", "torch.distributed.run"]
    if n_nodes == 1:
        return [*run, "--standalone", f"--nproc_per_node={n_gpus}", *rest]
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MASTER={master!r}: give the first machine as host:port, e.g. MASTER=node0:29500")
    nodes_args = [
        f"--nnodes={n_nodes}",
        f"--node_rank={rank}",
        f"--master_addr={host}",
        f"--master_port={port}",
    ]
    return [*run, *nodes_args, f"--nproc_per_node={n_gpus}", *rest]


@cli
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m pipeline.core.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1", help="processes per machine (GPUS=)")
    p.add_argument("--nodes", default="1", help="machines (NODES=)")
    p.add_argument("--node-rank", default="0", help="this machine's rank, 0..NODES-1 (NODE_RANK=)")
    p.add_argument("--master", default="127.0.0.1:29500", help="host:port of machine 0 (MASTER=)")
    a = p.parse_args(own)
    if not rest:
        raise ConfigError("nothing to launch: give the command after --, e.g. -- -m pipeline.train")
    cmd = command(a.gpus, a.nodes, a.node_rank, a.master, rest)
    if int(a.nodes) > 1:
        print(
            f"node {a.node_rank} of {a.nodes}: joining the job at {a.master} (every machine runs the same "
            "command with its own NODE_RANK; torchrun waits until all have joined)",
            file=sys.stderr,
            flush=True,
        )
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # becomes the command: signals, exit code and output are its own
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
