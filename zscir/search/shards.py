"""Encoding by several processes: which process encodes which part, per-part progress, and merging the parts in order.

Under ``torchrun`` or ``accelerate launch`` every process runs the same
command. :func:`current_workers` tells a process its rank and how many there
are; a :class:`ShardedRun` splits the list of items still to encode into
contiguous parts (one per process of the first run), each process encodes its
parts into its own shard folder under ``<target>/shards/``, and the main
process merges the parts in order, so the result equals a one-process run in
the same order. Every part resumes by itself: a killed run continues where
each part stopped, with any number of processes (parts are handed out round
robin).

A shard folder is trusted only if it was written with the same settings
(``fields``: model key, metric, precision ...) and reads back whole: shards of
other settings, corrupt shards and processes that see different item lists
are one clear error, and the target folder is never touched by a refused run.
The shards folder must be on a filesystem every process sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from ..checkpoint import atomic_write_json, read_json_object
from .store import EmbeddingStore, Id, StoreError

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
PLAN_NAME = "plan.json"
DONE_SUFFIX = ".done.json"
_BARRIER_TIMEOUT_S = 7 * 24 * 3600  # a barrier waits for the slowest part: hours on a large corpus


class Workers:
    """The processes of a run (this one: a single process); subclasses synchronise real ones."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} processes")
        self.rank, self.world = int(rank), int(world)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world={self.world})"

    @property
    def is_main(self) -> bool:
        """True for the process that merges parts and writes the outputs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def gather_bytes(self, blob: bytes) -> List[bytes]:
        """Every process's `blob`, in rank order, on every process."""
        return [bytes(blob)]


class DistributedWorkers(Workers):
    """Processes started by torchrun / accelerate launch, synchronised over a gloo group (CPU, long timeout)."""

    _group: Any = None

    def _gloo(self) -> Any:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            from accelerate import PartialState

            PartialState()  # the process group Accelerate (and later training in this process) uses
        if DistributedWorkers._group is None:
            # a second, CPU group: barriers and byte gathers work whatever the default backend (nccl) is,
            # and wait as long as the slowest part takes
            DistributedWorkers._group = dist.new_group(backend="gloo",
                                                       timeout=datetime.timedelta(seconds=_BARRIER_TIMEOUT_S))
        return DistributedWorkers._group

    def barrier(self) -> None:
        """Wait until every process gets here."""
        import torch.distributed as dist

        dist.barrier(group=self._gloo())

    def gather_bytes(self, blob: bytes) -> List[bytes]:
        """Every process's `blob`, in rank order, on every process (sizes first, then padded bytes)."""
        import torch
        import torch.distributed as dist

        group = self._gloo()
        size = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=group)
        top = max(int(s) for s in sizes)
        buf = torch.zeros(max(top, 1), dtype=torch.uint8)
        if blob:
            buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        outs = [torch.zeros_like(buf) for _ in range(self.world)]
        dist.all_gather(outs, buf, group=group)
        return [bytes(o[: int(s)].numpy().tobytes()) for o, s in zip(outs, sizes)]


def current_workers() -> Workers:
    """This process's place in the run: torch.distributed if initialised, else WORLD_SIZE / RANK (torchrun, accelerate)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            return DistributedWorkers(rank, world) if world > 1 else Workers()
    except ImportError:  # torch without distributed support
        pass
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Workers()
    return DistributedWorkers(int(os.environ.get("RANK", "0") or 0), world)


def part_bounds(count: int, part: int, parts: int) -> Tuple[int, int]:
    """The [start, stop) positions of part `part` of `parts` contiguous, balanced parts of `count` items."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")
    return count * part // parts, count * (part + 1) // parts


def items_digest(items: Sequence[Id]) -> str:
    """A digest of an item list (order included): processes and resumed runs check they work on the same list."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def _read_json(path: Path, error: Type[Exception]) -> Dict[str, Any]:
    return read_json_object(path, error, hint="remove it to start its part again")


class ShardedRun:
    """Items of one target folder encoded by every process of a run, each into its parts' shard folders.

    Every process calls, in this order: :meth:`begin` (agree on the items and
    the plan), :meth:`my_parts` (encode each into its folder; :meth:`mark_done`
    when finished) and :meth:`finish` (the main process merges the parts in
    order and removes the shards). ``fields``: the settings every part must
    share (JSON values); ``check_part``: opens a part folder and raises if it is
    corrupt (default: an :class:`EmbeddingStore`, if one was created there).
    """

    def __init__(self, root: Path, fields: Mapping[str, Any], workers: Optional[Workers] = None,
                 error: Type[Exception] = StoreError, noun: str = "store",
                 check_part: Optional[Callable[[Path], None]] = None) -> None:
        self.root = Path(root)
        self.fields = json.loads(json.dumps(dict(fields)))  # as they read back from JSON
        self.workers = workers or current_workers()
        self.error, self.noun = error, noun
        self.check_part = check_part or _open_store_part
        self.plan: Optional[Dict[str, Any]] = None

    @property
    def active(self) -> bool:
        """Whether to encode through shards: several processes, or parts of an interrupted run are waiting."""
        return self.workers.world > 1 or (self.root / PLAN_NAME).is_file()

    def part_folder(self, part: int, parts: Optional[int] = None) -> Path:
        """The folder of one part."""
        parts = parts if parts is not None else int(self._plan()["parts"])
        return self.root / f"{part:05d}-of-{parts:05d}"

    def _plan(self) -> Dict[str, Any]:
        if self.plan is None:
            raise RuntimeError("ShardedRun.begin() first")
        return self.plan

    def _read_plan(self) -> Optional[Dict[str, Any]]:
        path = self.root / PLAN_NAME
        if not path.is_file():
            return None
        plan = _read_json(path, self.error)
        for name in ("fields", "items_digest", "count", "parts"):
            if name not in plan:
                raise self.error(f"{path}: missing field {name!r}; remove {self.root} to start the parts again")
        return plan

    def _refuse_other_settings(self, fields: Mapping[str, Any], where: Path) -> None:
        for name in sorted(set(fields) | set(self.fields)):
            theirs, ours = fields.get(name), self.fields.get(name)
            if theirs != ours:
                raise self.error(
                    f"{where} was written with {name}={theirs!r}, this run uses {name}={ours!r}: shards of other "
                    f"settings are never merged; rerun with the same settings, or remove {self.root} to drop them "
                    f"(the {self.noun} itself is untouched)"
                )

    def check(self) -> Optional[Dict[str, Any]]:
        """Read-only: the plan of an interrupted run, after checking its settings and every part folder; None if none."""
        plan = self._read_plan()
        if plan is None:
            return None
        self._refuse_other_settings(plan["fields"], self.root / PLAN_NAME)
        parts = int(plan["parts"])
        for part in range(parts):
            folder = self.part_folder(part, parts)
            done = folder.with_name(folder.name + DONE_SUFFIX)
            if done.is_file():
                self._refuse_other_settings(_read_json(done, self.error).get("fields", {}), done)
            if folder.exists():
                try:
                    self.check_part(folder)
                except StoreError as err:
                    raise self.error(f"corrupt shard {folder}: {err}; remove that folder (and {done.name}) to encode "
                                     f"its part again (the {self.noun} itself is untouched)") from None
        return plan

    def begin(self, items: Callable[[], Sequence[Id]], merge: Callable[[Path, Dict[str, Any]], None]) -> List[Id]:
        """Every process: agree on the items to encode and the plan; returns the items (empty: nothing to do).

        `items` lists what the target still lacks (each process calls it); a
        plan of an interrupted run over another item list (the target or the
        inputs changed since, or a merge was interrupted) is merged first,
        whatever its parts finished, through `merge` (as in :meth:`finish`), and dropped.
        """
        plan = self.check()  # every process: the same clear error, before anyone changes anything
        self.workers.barrier()
        if self.workers.is_main:
            current = list(items())
            if plan is not None and plan["items_digest"] != items_digest(current):
                logger.warning("%s: the parts of an interrupted run cover another item list; merging what they "
                               "finished, then planning the rest", self.root)
                for part in range(int(plan["parts"])):
                    folder = self.part_folder(part, int(plan["parts"]))
                    done = folder.with_name(folder.name + DONE_SUFFIX)
                    merge(folder, _read_json(done, self.error) if done.is_file() else {})
                shutil.rmtree(self.root)
                current, plan = list(items()), None
            if plan is None and current:
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.root / PLAN_NAME, {"fields": self.fields, "items_digest": items_digest(current),
                                                          "count": len(current), "parts": self.workers.world})
        self.workers.barrier()
        if not self.workers.is_main:
            current = list(items())
        self.plan = self._read_plan()
        if self.plan is None:
            return []
        if self.plan["items_digest"] != items_digest(current) or self.plan["count"] != len(current):
            raise self.error(f"process {self.workers.rank} sees another list of {len(current)} items than the plan in "
                             f"{self.root} ({self.plan['count']}): every process must see the same inputs and folders")
        return current

    def my_parts(self) -> List[Tuple[int, int, int, Path]]:
        """This process's parts: (part, start, stop, folder); positions index the items :meth:`begin` returned."""
        if self.plan is None:
            return []  # nothing to encode
        plan = self.plan
        parts = int(plan["parts"])
        return [(p, *part_bounds(int(plan["count"]), p, parts), self.part_folder(p, parts))
                for p in range(parts) if p % self.workers.world == self.workers.rank]

    def is_done(self, part: int) -> bool:
        """Whether a part was marked finished."""
        folder = self.part_folder(part)
        return folder.with_name(folder.name + DONE_SUFFIX).is_file()

    def mark_done(self, part: int, **info: Any) -> None:
        """Record that a part is finished, with what its merge needs (e.g. skipped items)."""
        folder = self.part_folder(part)
        atomic_write_json(folder.with_name(folder.name + DONE_SUFFIX),
                          {"fields": self.fields, "items_digest": self._plan()["items_digest"], **info})

    def done_info(self, part: int) -> Dict[str, Any]:
        """What :meth:`mark_done` recorded for a part."""
        folder = self.part_folder(part)
        return _read_json(folder.with_name(folder.name + DONE_SUFFIX), self.error)

    def finish(self, merge: Callable[[Path, Dict[str, Any]], None]) -> None:
        """Every process: wait for all parts; the main process merges them in order and removes the shards.

        `merge(folder, info)` adds one part to the target (info: what :meth:`mark_done` recorded); it must skip
        rows the target already holds, so that merging again after an interrupted merge adds nothing twice.
        """
        self.workers.barrier()
        if self.workers.is_main:
            parts = int(self._plan()["parts"])
            missing = [p for p in range(parts) if not self.is_done(p)]
            if missing:
                raise self.error(
                    f"parts {missing} of {self.root} are not finished although every process returned: the folder must "
                    "be on a filesystem every process sees; run again to resume them"
                )
            for part in range(parts):
                merge(self.part_folder(part, parts), self.done_info(part))
            shutil.rmtree(self.root)
        self.workers.barrier()


def _open_store_part(folder: Path) -> None:
    """A part folder holding an embedding store (if it got one): it must open whole."""
    if (folder / "meta.json").is_file():
        EmbeddingStore.open(folder)


__all__ = ["DistributedWorkers", "ShardedRun", "SHARDS_DIR", "Workers", "current_workers", "items_digest",
           "part_bounds"]
