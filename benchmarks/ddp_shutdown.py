# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""How often a two-rank gloo DDP run aborts at exit, by way of ending it (monai_proto.apps.shutdown_distributed).

Each run launches ``torchrun --nproc_per_node=2`` on this file: both ranks train a small DDP network for two steps
and gather a tensor, rank 0 then stays busy for ``--busy`` seconds (as it does writing checkpoints at the end of a
bundle run) while rank 1 ends the run and exits. The run fails when a rank is killed, typically rank 1 with
"terminate called without an active exception" (SIGABRT). Ways of ending:

- ``destroy``: ``torch.distributed.destroy_process_group()`` alone (what the bundles did before);
- ``barrier``: a barrier right after the all-gather (before rank 0's busy time), then ``destroy_process_group()``;
- ``shutdown``: ``monai_proto.apps.shutdown_distributed(network)`` (the reducer released first; what the bundles do).

The abort needs a loaded machine: run it while the cores are busy (for example ``--load 2`` spins two busy
processes for the duration), one way at a time.

    python benchmarks/ddp_shutdown.py --runs 15 --load 2
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("destroy", "barrier", "shutdown")


def _rank_main(way: str, busy: float) -> None:
    import torch
    import torch.distributed as dist

    from monai_proto.apps import shutdown_distributed

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    network = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv3d(1, 2, 3), device_ids=None)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        network(torch.randn(1, 1, 8, 8, 8)).mean().backward()
        optimizer.step()
    gathered = [torch.zeros(3) for _ in range(2)]
    dist.all_gather(gathered, torch.full((3,), float(rank)))
    if way == "barrier":
        dist.barrier()
    if rank == 0:
        time.sleep(busy)
    if way == "shutdown":
        shutdown_distributed(network)
    else:
        dist.destroy_process_group()


def _kill_ranks() -> None:
    """Kill this script's rank processes (``--rank_main``), which a hung run leaves behind."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--rank_main" in argv and any(a.endswith(b"ddp_shutdown.py") for a in argv):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--runs", type=int, default=15, help="torchrun launches per way")
    parser.add_argument("--busy", type=float, default=1.0, help="seconds rank 0 stays busy before ending")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes kept running meanwhile")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as hung")
    parser.add_argument("--port", type=int, default=29850)
    parser.add_argument("--rank_main", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        _rank_main(args.rank_main, args.busy)
        return
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    repo = str(Path(__file__).resolve().parents[1])  # monai_proto for the ranks, from any working directory
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    try:
        for w, way in enumerate(args.ways):
            failed = []
            for i in range(args.runs):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
                port = args.port + w * args.runs + i  # a port of its own for every run
                cmd += [f"--master_port={port}", __file__, "--rank_main", way, "--busy", str(args.busy)]
                with tempfile.TemporaryFile("w+") as log:
                    run = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
                    try:
                        run.wait(timeout=args.timeout)
                    except subprocess.TimeoutExpired:
                        _kill_ranks()  # torchrun starts the ranks in sessions of their own
                        run.kill()
                        run.wait()
                        failed.append(f"run {i + 1} (hung: more than {args.timeout:g} s)")
                        continue
                    log.seek(0)
                    output = log.read()
                if run.returncode != 0:
                    aborted = "terminate called without an active exception" in output
                    why = "terminate/SIGABRT" if aborted else f"rc {run.returncode}"
                    failed.append(f"run {i + 1} ({why})")
            print(f"{way}: {len(failed)} of {args.runs} runs failed" + (f": {', '.join(failed)}" if failed else ""))
    finally:
        for process in load:
            process.kill()


if __name__ == "__main__":
    main()
