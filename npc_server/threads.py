"""Which threads run torch, and on how many cores.

Torch's OpenMP runtime (libgomp) lets idle workers spin between parallel regions only while the process has no
more OpenMP threads than cores; past that it parks them at once and every region pays a wake-up. A decode step is
hundreds of small regions: one step of the 135M model takes ~23 ms on 2 cores with one multi-threaded team in the
process and ~40 ms with two. So one thread owns a multi-threaded team (the batched engine's scheduler, or the
caller of `LocalEngine.generate`), every other thread that touches torch uses one core, and work that wants every
core once (loading and packing weights) runs in a thread that ends afterwards, taking its workers with it.
`OMP_WAIT_POLICY=PASSIVE` parks the workers always: leave it unset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def use_cores(n: int) -> None:
    """Torch on the calling thread uses `n` cores from now on."""
    # torch sets a thread's count up on its first use, to the count last set on any thread: run that set-up
    # first, or it would undo this later.
    torch.get_num_threads()
    torch.set_num_threads(n)


def one_core() -> None:
    """Torch on the calling thread uses one core (an executor's initializer)."""
    use_cores(1)


async def in_own_thread(fn: Callable[..., T], *args: object) -> T:
    """Run blocking `fn` in a new thread that ends when it returns."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)
