"""Helpers of the multi-process tests: a scenario run by two gloo processes on the CPU, each rank's result
compared bitwise (imports nothing that loads the emulated CUDA library, so the spawned ranks start fast)."""
import os
import sys
import threading
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 120


def _worker(rank: int, scenario: Callable, option: Any, folder: str) -> None:
    # a rank left waiting in a collective ends its process, so the test fails instead of hanging
    watchdog = threading.Timer(TIMEOUT_S, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=WORLD)
    try:
        torch.save(scenario(rank, option), f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()
    leave()


def leave() -> None:
    """Ends a finished rank without the interpreter's teardown, where gloo's threads sometimes abort the process
    ("terminate called without an active exception", about one exit in ten here) after its work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(tmp_path, scenario: Callable, option: Any = None) -> List[Any]:
    """``scenario(rank, option)`` (a module-level function) in WORLD processes of one gloo group; their results."""
    mp.spawn(_worker, args=(scenario, option, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]


def flat(state) -> List[torch.Tensor]:
    """Every tensor (and number) of nested dicts, lists and tuples, dict keys sorted."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state) for t in flat(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in flat(v)]
    return [torch.tensor(state)]


def bitwise_equal(a, b) -> bool:
    fa, fb = flat(a), flat(b)
    return len(fa) == len(fb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(fa, fb))
