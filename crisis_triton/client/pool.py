"""The batch's worker threads: `run_pool` runs a function over items on a bounded pool (at most
twice the thread count queued, so a huge batch is not read into futures at once) and hands each
result to the calling thread as it completes, in completion order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

A = TypeVar("A")
R = TypeVar("R")


def run_pool(
    items: Iterable[A],
    work: Callable[[A], R],
    on_result: Callable[[R], None],
    *,
    concurrency: int = 1,
    thread_name_prefix: str = "batch",
) -> None:
    """`on_result(work(item))` for every item, `work` on `concurrency` threads, `on_result` in the
    calling thread. An exception raised by `work` stops the run: the items not started are
    cancelled, those under way are awaited and their successful results still go to `on_result`,
    then the exception is raised. Ctrl-C (KeyboardInterrupt) leaves at once, without waiting."""
    workers = max(1, concurrency)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix)
    in_flight: dict[Future[R], A] = {}
    queue: Iterator[A] = iter(items)
    interrupted = False

    def fill() -> None:
        while len(in_flight) < 2 * workers:
            for item in queue:
                in_flight[pool.submit(work, item)] = item
                break
            else:
                return

    try:
        fill()
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for fut in done:
                del in_flight[fut]
                on_result(fut.result())
            fill()
    except KeyboardInterrupt:
        interrupted = True
        raise
    except BaseException:
        # A failure of the whole run: keep the results that were already under way and succeed.
        for fut in in_flight:
            fut.cancel()
        for fut in in_flight:
            if not fut.cancelled() and fut.exception() is None:
                on_result(fut.result())
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
