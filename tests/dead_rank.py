"""Helper script for tests/test_distributed.py (not a test module): two trainer ranks over gloo; rank 1 dies
(os._exit) right after joining, rank 0 then sends it a command as ShardedLearner does. Rank 0 must fail with an
error, well within the group's timeout, instead of hanging.    python tests/dead_rank.py TIMEOUT_S"""
import os
import sys
import time

import torch.multiprocessing as mp

from asyncwebrl import distributed as dist


def rank_main(rank: int, port: int, timeout_s: float):
    dist.init(rank, 2, port, "cpu", timeout_s)
    if rank == 1:
        os._exit(3)  # a rank killed by the OOM killer, say
    time.sleep(1)
    t0 = time.time()
    try:
        dist._broadcast(("update", []))
        dist._broadcast(("update", []))
    except Exception as e:
        print(f"rank 0: {type(e).__name__} after {time.time() - t0:.1f} s", flush=True)
        os._exit(0)
    print("rank 0: no error", flush=True)
    os._exit(1)


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(rank_main, args=(port, float(sys.argv[1])), nprocs=2, join=False, start_method="spawn")
    ctx.processes[0].join()  # the test's own timeout ends us if rank 0 hangs
    sys.exit(ctx.processes[0].exitcode)
