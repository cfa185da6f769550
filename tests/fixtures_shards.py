"""Several "processes" in threads of one test: Workers synchronised by a threading.Barrier, for sharded encoding tests."""
import threading
from typing import Any, Callable, List

from zscir.search.shards import Workers


class ThreadWorkers(Workers):
    """Rank `rank` of `world` threads; a failing thread breaks the barrier so the others stop too."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier, box: List[Any]) -> None:
        super().__init__(rank, world)
        self._barrier, self._box = barrier, box

    def barrier(self) -> None:
        self._barrier.wait(timeout=120)

    def gather_bytes(self, blob: bytes) -> List[bytes]:
        self._box[self.rank] = bytes(blob)
        self.barrier()
        out = list(self._box)
        self.barrier()
        return out


_local = threading.local()


def thread_workers() -> Workers:
    """The Workers of the calling thread (a single process outside run_ranks): patch it over current_workers."""
    return getattr(_local, "workers", None) or Workers()


def run_ranks(fn: Callable[[int], Any], world: int = 2) -> List[Any]:
    """Run fn(rank) in `world` threads as ranks of one run; returns their results, or raises the first error by rank."""
    barrier = threading.Barrier(world)
    box: List[Any] = [None] * world
    results: List[Any] = [None] * world
    errors: List[BaseException] = [None] * world

    def target(rank: int) -> None:
        _local.workers = ThreadWorkers(rank, world, barrier, box)
        try:
            results[rank] = fn(rank)
        except BaseException as err:  # noqa: BLE001  (handed to the test thread)
            errors[rank] = err
            barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    if any(errors):
        raise next(e for e in errors if e is not None)
    return results
