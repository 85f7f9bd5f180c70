"""Which threads run torch on how many cores (npc_server/threads.py)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from npc_server.threads import in_own_thread, one_core, use_cores


def test_one_core_limits_only_the_calling_thread() -> None:
    use_cores(2)
    with ThreadPoolExecutor(max_workers=1, initializer=one_core) as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2  # the caller's own count is untouched


def test_in_own_thread_runs_in_a_thread_that_ends() -> None:
    async def main() -> threading.Thread:
        return await in_own_thread(threading.current_thread)

    worker = asyncio.run(main())
    assert worker is not threading.main_thread()
    worker.join(timeout=5)
    assert not worker.is_alive()


def test_in_own_thread_passes_errors_on() -> None:
    def fail() -> None:
        raise ValueError("no model here")

    async def main() -> None:
        await in_own_thread(fail)

    try:
        asyncio.run(main())
    except ValueError as exc:
        assert "no model" in str(exc)
    else:
        raise AssertionError("the error was swallowed")
