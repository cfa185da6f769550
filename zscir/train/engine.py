"""One training engine for every stage (tiny-CLIP pretraining, Stage I, Stage II, SPN bank stage).

A stage is a :class:`TrainTask`: a module whose ``forward(batch)`` returns
per-sample tensors, a ``loss(outputs, step)`` over the *global* batch, and a way
to build a batch from example indices. The engine owns everything else:
Accelerate (CPU, one or several GPUs, several nodes), seeded deterministic
sampling, AdamW with warm-up + cosine schedule, gradient clipping, tqdm
progress, periodic full-state checkpoints and resume.

Several processes: every rank draws the same global batch of indices and
takes its shard; per-sample outputs are all-gathered with gradients (the
gather's backward sums over ranks), each rank computes the same global loss,
and DDP averages the gradients, which yields exactly the single-process
gradient (see :meth:`Trainer.train`). So a run on N processes matches a
1-process run with the same global batch.

Checkpoints never use pickle: trainable weights and optimizer moments go to
safetensors, step/RNG/scheduler state to JSON, both written atomically. The two
are bound: the weights go to a file named after the step, then ``state.json``
(the commit point) names that file and its SHA-256, then older weight files are
removed. A kill between the two writes leaves the previous complete pair in
place, and a JSON whose weights file was replaced is refused on resume; a JSON
and weights of different steps are never mixed.

Ctrl-C: the first one finishes the running step, saves and stops (a second stops
at once); an interrupt raised inside a step rewinds the RNG streams to the step's
start before saving, so resuming reproduces an uninterrupted run exactly. An
interrupt while the optimiser changes the weights saves nothing (that state is
half-updated): the last checkpoint stays.

Accelerate's own settings apply: a run whose config names no mixed precision uses
the one ``accelerate launch`` / ``accelerate config`` set (float32 when none), and
``ACCELERATE_USE_CPU`` keeps it on the CPU. Logged values also go to Accelerate's
experiment trackers (TensorBoard, Weights & Biases) inside an
:func:`experiment_tracking` block (the CLI's ``--report-to``).
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..checkpoint import (CheckpointError, atomic_write_json, file_sha256, load_tensors, read_json,
                          save_tensors)
from ..config import Config
from ..precision import accelerate_precision, resolve_precision

logger = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_WEIGHTS = "state.safetensors"  # the weights of states written before the pair was bound (read only)
STATE_META = "state.json"
_STEP_WEIGHTS = re.compile(r"state-\d+\.safetensors")


@dataclasses.dataclass
class TrainConfig(Config):
    """Optimisation and bookkeeping settings shared by every stage."""

    steps: int = 500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # "no", "fp16", "bf16", "auto" (zscir.precision; applied by Accelerate) or None: Accelerate's configured one
    mixed_precision: Optional[str] = None
    save_every: int = 0  # steps between full-state checkpoints; 0: only at the end
    log_every: int = 10


#: Experiment trackers ``--report-to`` accepts, and how to tell whether each is installed.
TRACKERS: Dict[str, Tuple[str, str]] = {
    "tensorboard": ("is_tensorboard_available", "pip install tensorboard"),
    "wandb": ("is_wandb_available", "pip install wandb"),
}
REPORT_TO = ("none", *TRACKERS)


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where the logged training values go: Accelerate trackers writing under `logging_dir`."""

    trackers: Tuple[str, ...]
    logging_dir: Path
    config: Dict[str, Any] = dataclasses.field(default_factory=dict)  # run settings shown beside the curves


_TRACKING: "contextvars.ContextVar[Optional[Tracking]]" = contextvars.ContextVar("zscir_tracking", default=None)


def check_trackers(report_to: Union[str, Sequence[str], None]) -> Tuple[str, ...]:
    """The tracker names of ``--report-to`` ("none", "tensorboard", "wandb"; comma-separated), each installed."""
    import accelerate.utils

    names = [n.strip() for n in (report_to.split(",") if isinstance(report_to, str) else report_to or ()) if n.strip()]
    out = []
    for name in names:
        if name == "none":
            continue
        if name not in TRACKERS:
            raise ValueError(f"--report-to {name!r}: not a tracker zscir reports to; choose from {', '.join(REPORT_TO)}")
        check, install = TRACKERS[name]
        if not getattr(accelerate.utils, check)():
            raise ImportError(f"--report-to {name} needs the {name} package, which is not installed: {install}")
        out.append(name)
    return tuple(dict.fromkeys(out))


@contextlib.contextmanager
def experiment_tracking(report_to: Union[str, Sequence[str], None], logging_dir: Union[str, os.PathLike],
                        config: Optional[Dict[str, Any]] = None) -> Iterator[Tuple[str, ...]]:
    """Within the block, every :class:`Trainer` reports its logged values to these trackers under `logging_dir`."""
    trackers = check_trackers(report_to)
    token = _TRACKING.set(Tracking(trackers, Path(logging_dir), dict(config or {})) if trackers else None)
    try:
        yield trackers
    finally:
        _TRACKING.reset(token)


def _scalar_config(config: Dict[str, Any], prefix: str = "") -> Dict[str, Union[int, float, str, bool]]:
    """A nested config as flat scalars (what TensorBoard's hyper-parameter view takes)."""
    out: Dict[str, Union[int, float, str, bool]] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalar_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class TrainTask(abc.ABC):
    """What a stage supplies to the engine."""

    module: nn.Module  # forward(batch) -> dict of per-sample tensors; trainable parameters have requires_grad

    @abc.abstractmethod
    def num_examples(self) -> int:
        """Size of the example pool that batches are drawn from."""

    @abc.abstractmethod
    def make_batch(self, indices: torch.Tensor, step: int) -> Any:
        """Build this rank's batch from example indices."""

    @abc.abstractmethod
    def loss(self, outputs: Dict[str, torch.Tensor], batch: Any, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss over the global batch (outputs gathered from all ranks) and scalar logs."""

    def on_step_end(self, step: int, module: nn.Module) -> None:
        """Hook after each optimiser step (e.g. refresh mined negatives); state a step changes is best changed here."""

    def extra_state(self) -> Dict[str, torch.Tensor]:
        """Non-parameter tensors to checkpoint (e.g. running statistics)."""
        return {}

    def load_extra_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` returned."""


@dataclasses.dataclass
class TrainResult:
    """History of logged values (one dict per logged step) and wall time."""

    history: List[Dict[str, float]]
    seconds: float
    resumed_from: int = 0


def epoch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Global batch for `step`: consecutive slices of per-epoch seeded permutations (resumable, rank-independent)."""
    if num_examples <= 0:
        raise ValueError("the training set is empty")
    start = step * batch_size
    out: List[torch.Tensor] = []
    while len(out) == 0 or sum(len(o) for o in out) < batch_size:
        epoch, offset = divmod(start, num_examples)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(num_examples, generator=g)
        take = perm[offset: offset + batch_size - sum(len(o) for o in out)]
        out.append(take)
        start += len(take)
    return torch.cat(out)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_lr_ratio``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _param_groups(module: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient of this rank's rows over all ranks."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), value.shape[0]
        parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def _gather(outputs: Dict[str, torch.Tensor], world: int, local_batch: int) -> Dict[str, torch.Tensor]:
    """All-gather per-sample outputs with gradients (rows of this rank keep their graph); others pass through."""
    if world == 1:
        return outputs
    return {key: _GatherRows.apply(value)
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == local_batch else value
            for key, value in outputs.items()}


def _grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (what clip_grad_norm_ measures)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _rng_state() -> Dict[str, Any]:
    """The python and numpy global RNG states as JSON (torch's go to safetensors)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": _jsonable(random.getstate()),
            "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)}}


def _set_rng_state(rng: Dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` returned."""
    random.setstate(_to_tuple(rng["python"]))
    state = rng.get("numpy")
    if isinstance(state, dict):
        np.random.set_state((state["name"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                             state["has_gauss"], state["cached_gaussian"]))
    else:  # states written before the numpy position was saved: the key array alone cannot resume the stream
        logger.debug("this training state lacks the full numpy RNG state; numpy draws will not continue the run")


def _rng_snapshot(device: torch.device) -> Tuple[Any, ...]:
    """Every RNG stream a step may draw from (torch CPU and CUDA, python, numpy), in memory."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_rng(snapshot: Tuple[Any, ...], device: torch.device) -> None:
    """Put back what :func:`_rng_snapshot` took."""
    cpu, cuda, py, npy = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    random.setstate(py)
    np.random.set_state(npy)


class _StopRequest:
    """SIGINT during training: the first asks to stop after the running step, a second stops at once."""

    def __init__(self, desc: str) -> None:
        self.desc, self.requested, self._previous = desc, False, None

    def __enter__(self) -> "_StopRequest":
        # only the main thread may set handlers; a handler the user installed is left alone
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s: Ctrl-C: finishing this step, then saving a resumable state (Ctrl-C again to stop now)",
                       self.desc)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def read_state(output_dir: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The JSON and the tensors of the training state in ``output_dir/state``, checked to belong together."""
    state_dir = Path(output_dir) / STATE_DIR
    meta_path = state_dir / STATE_META
    meta = read_json(meta_path, missing="training state not found")
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{meta_path}: not a training state (expected a JSON object with a step)")
    ref = meta.get("tensors")
    if ref is None:  # written before the pair was bound: nothing to check it against
        logger.warning("%s predates bound checkpoints; its weights cannot be checked to be of step %s",
                       meta_path, meta.get("step"))
        return meta, load_tensors(state_dir / STATE_WEIGHTS)
    name = ref.get("file") if isinstance(ref, dict) else None
    if not isinstance(name, str) or not _STEP_WEIGHTS.fullmatch(name):
        raise CheckpointError(f"{meta_path}: field 'tensors' must name a state-<step>.safetensors file, got {ref!r}")
    path = state_dir / name
    if not path.is_file():
        raise CheckpointError(f"{meta_path} (step {meta.get('step')}) names {name}, which is missing")
    digest = file_sha256(path)
    if digest != ref.get("sha256"):
        raise CheckpointError(
            f"{meta_path} (step {meta.get('step')}) does not match its weights file {name}: the recorded digest "
            f"{str(ref.get('sha256'))[:16]} differs from the file's {digest[:16]} (the file was replaced; a torn or "
            "mixed checkpoint is never resumed)"
        )
    return meta, load_tensors(path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def _release_other_precision(precision: str) -> None:
    """Let this process build an Accelerator in `precision` after one in another precision.

    Accelerate keeps one process-wide state and refuses to change its precision; only that part is reset here,
    the process group (PartialState) stays.
    """
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision:
        AcceleratorState._reset_state()


def _tracker_project(desc: str) -> str:
    """A tracker run name from a stage description ("Stage I" -> "stage_i")."""
    return re.sub(r"[^a-z0-9]+", "_", desc.lower()).strip("_") or "train"


class Trainer:
    """Runs a :class:`TrainTask` with Accelerate; resumable from ``output_dir/state``."""

    def __init__(self, task: TrainTask, cfg: TrainConfig, output_dir: Optional[Path] = None,
                 progress: bool = True, cpu: Optional[bool] = None, desc: str = "train") -> None:
        from accelerate import Accelerator

        self.task, self.cfg, self.desc = task, cfg, desc
        self.output_dir = Path(output_dir) if output_dir else None
        self.progress = progress
        if cpu is None:
            cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        use_cpu = cpu
        requested = cfg.mixed_precision or accelerate_precision() or "no"  # None: Accelerate's setting decides
        precision = resolve_precision(requested, "cpu" if use_cpu else "cuda", f"{desc}: mixed_precision")
        _release_other_precision(precision)
        self.tracking = _TRACKING.get()
        trackers = list(self.tracking.trackers) if self.tracking else None
        self.accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision, log_with=trackers,
                                       project_dir=str(self.tracking.logging_dir) if self.tracking else None)
        world = self.accelerator.num_processes
        if cfg.batch_size % world:
            raise ValueError(f"{desc}: batch_size {cfg.batch_size} does not divide over {world} processes "
                             f"(each takes an equal share of the global batch); use a multiple of {world}")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.module = task.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{desc}: the module has no trainable parameters")
        self.optimizer = torch.optim.AdamW(_param_groups(self.module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.wrapped, self.optimizer = self.accelerator.prepare(self.module, self.optimizer)
        self.history: List[Dict[str, float]] = []
        self.step = 0
        if self.tracking:
            run_config = {"train": cfg.to_dict(), **self.tracking.config}
            self.accelerator.init_trackers(_tracker_project(desc), config=_scalar_config(run_config))

    # ----------------------------------------------------------- checkpoints
    @property
    def state_dir(self) -> Optional[Path]:
        """Folder of the resumable training state."""
        return self.output_dir / STATE_DIR if self.output_dir else None

    def _trainable_names(self) -> List[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    def save_state(self) -> None:
        """Write trainable weights, optimiser moments, schedule, RNG and history (atomically, main process only)."""
        if self.state_dir is None:
            return
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        tensors: Dict[str, torch.Tensor] = {}
        named = dict(self.module.named_parameters())
        names = self._trainable_names()
        for name in names:
            tensors[f"param.{name}"] = named[name].detach()
        opt_state = self.optimizer.state_dict()["state"]
        index_of = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        order = [index_of[id(named[n])] for n in names]
        opt_steps = {}
        for name, idx in zip(names, order):
            st = opt_state.get(idx)
            if not st:
                continue
            tensors[f"adam.exp_avg.{name}"] = st["exp_avg"]
            tensors[f"adam.exp_avg_sq.{name}"] = st["exp_avg_sq"]
            opt_steps[name] = float(st["step"])
        for key, value in self.task.extra_state().items():
            tensors[f"extra.{key}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if self.accelerator.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.accelerator.device)
        name = f"state-{self.step:08d}.safetensors"
        digest = save_tensors(self.state_dir / name, tensors, metadata={"step": str(self.step)})
        meta = {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "scheduler_last_epoch": self.scheduler.last_epoch,
            "adam_steps": opt_steps,
            "rng": _rng_state(),
            "history": self.history,
            "desc": self.desc,
            "num_examples": self.task.num_examples(),
            "precision": self.accelerator.mixed_precision,
            "tensors": {"file": name, "sha256": digest},
        }
        atomic_write_json(self.state_dir / STATE_META, meta)  # the commit point: from here on `name` is the state
        for old in self.state_dir.iterdir():
            if old.name != name and (old.name == STATE_WEIGHTS or _STEP_WEIGHTS.fullmatch(old.name)):
                old.unlink()

    def has_state(self) -> bool:
        """Whether a resumable state exists in the output folder."""
        return bool(self.state_dir and (self.state_dir / STATE_META).is_file())

    def load_state(self) -> None:
        """Restore everything :meth:`save_state` wrote; refuses a state made with another config."""
        meta, tensors = read_state(self.output_dir)
        saved = dict(meta["config"])
        now = self.cfg.to_dict()
        # the precision is compared as it ran (a config may leave it to Accelerate: None)
        differ = [k for k in now if k not in ("steps", "save_every", "log_every", "mixed_precision")
                  and saved.get(k) != now[k]]
        ran = meta.get("precision") or resolve_precision(saved.get("mixed_precision") or "no",
                                                         self.accelerator.device)
        if ran != self.accelerator.mixed_precision:
            raise CheckpointError(
                f"cannot resume from {self.state_dir}: it trained in mixed precision {ran!r}, this run would use "
                f"{self.accelerator.mixed_precision!r}; pass --mixed-precision {ran} (or the Accelerate setting "
                "it ran with)")
        if differ:
            raise CheckpointError(
                f"cannot resume from {self.state_dir}: training config differs in {differ} "
                f"(saved {[saved.get(k) for k in differ]}, now {[now[k] for k in differ]})"
            )
        count = self.task.num_examples()
        if meta.get("num_examples", count) != count:
            raise CheckpointError(f"cannot resume from {self.state_dir}: it was trained on {meta['num_examples']} "
                                  f"examples, the training set now has {count} (another data set?)")
        named = dict(self.module.named_parameters())
        names = self._trainable_names()
        missing = [n for n in names if f"param.{n}" not in tensors]
        if missing:
            raise CheckpointError(f"{self.state_dir}: state lacks trainable tensors {missing[:3]}")
        with torch.no_grad():
            for n in names:
                named[n].copy_(tensors[f"param.{n}"])
        index_of = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        state = {}
        for n in names:
            if f"adam.exp_avg.{n}" in tensors:
                state[index_of[id(named[n])]] = {
                    "step": torch.tensor(meta["adam_steps"][n]),
                    "exp_avg": tensors[f"adam.exp_avg.{n}"].to(named[n].device),
                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{n}"].to(named[n].device),
                }
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        self.scheduler.last_epoch = meta["scheduler_last_epoch"]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_lambda(self.cfg)(self.scheduler.last_epoch)
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        if extra:
            self.task.load_extra_state(extra)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.accelerator.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.accelerator.device)
        _set_rng_state(meta["rng"])
        self.step = int(meta["step"])
        self.history = list(meta["history"])

    # ------------------------------------------------------------------ loop
    def train(self, resume: bool = False) -> TrainResult:
        """Run (or continue) the optimisation to ``cfg.steps``; Ctrl-C saves a resumable state first."""
        acc = self.accelerator
        resumed_from = 0
        if resume and self.has_state():
            self.load_state()
            resumed_from = self.step
            if acc.is_main_process:
                logger.info("%s: resumed from step %d", self.desc, self.step)
        elif resume and acc.is_main_process:
            logger.warning("%s: asked to resume, but there is no training state in %s; starting from step 0",
                           self.desc, self.state_dir)
        world, rank = acc.num_processes, acc.process_index
        n = self.task.num_examples()
        start = time.time()
        bar = None
        if self.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.desc, dynamic_ncols=True)
        interrupted = False
        # where an interrupt lands: "compute" (nothing changed but RNG draws: rewind them), "update" (weights
        # half-changed: save nothing) or "between" steps (a consistent state)
        phase, snapshot = "between", None
        stop = _StopRequest(self.desc) if self.state_dir is not None else None
        try:
            with stop or contextlib.nullcontext():
                while self.step < self.cfg.steps:
                    snapshot = _rng_snapshot(acc.device)
                    phase = "compute"
                    loss, logs, grad_norm = self._compute(n, world, rank)
                    phase = "update"
                    self._update(loss, logs, grad_norm, bar)
                    phase = "between"
                    self.task.on_step_end(self.step, self.module)
                    if bar is not None:
                        bar.update(1)
                    if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                        self.save_state()
                    if stop is not None and self._stop_requested(stop):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if bar is not None:
                bar.close()
            if interrupted and self.state_dir is not None:
                self._save_interrupted(phase, snapshot)
            if self.tracking:
                acc.end_training()  # flushes and closes the trackers' files
        self.save_state()
        return TrainResult(self.history, time.time() - start, resumed_from)

    def _logging_step(self) -> bool:
        """Whether the running step's values go to the history."""
        return (self.step + 1) % self.cfg.log_every == 0 or self.step + 1 == self.cfg.steps

    def _compute(self, n: int, world: int, rank: int) -> Tuple[torch.Tensor, Dict[str, float], Optional[torch.Tensor]]:
        """Batch, loss and gradients of the running step (weights untouched); the pre-clip gradient norm."""
        acc = self.accelerator
        indices = epoch_indices(n, self.cfg.batch_size, self.step, self.cfg.seed)
        local = indices[rank::world]
        batch = self.task.make_batch(local, self.step)
        self.wrapped.train()
        with acc.autocast():
            outputs = self.wrapped(batch)
            outputs = _gather(outputs, world, len(local))
            loss, logs = self.task.loss(outputs, batch, self.step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: loss became {loss.item()} at step {self.step}")
        # Factor 1, not the world size N: every rank computes the same global loss, so the gather's
        # backward (a sum over ranks) gives each rank N times the gradient through its own rows, and
        # DDP's mean over ranks turns that into the 1-process gradient; parameters that reach the loss
        # outside the gather (a logit scale) get the full gradient on every rank, which the mean keeps.
        acc.backward(loss)
        grad_norm = None
        if self.cfg.grad_clip:
            grad_norm = acc.clip_grad_norm_(self.params, self.cfg.grad_clip)  # returns the pre-clip norm
        elif self._logging_step():  # without clipping the norm is only needed for the history
            acc.unscale_gradients()
            grad_norm = _grad_norm(self.params)
        return loss, logs, grad_norm

    def _update(self, loss: torch.Tensor, logs: Dict[str, float], grad_norm: Optional[torch.Tensor], bar: Any) -> None:
        """Apply the step: optimiser, schedule, history; `self.step` moves on last, once all of it is done."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._logging_step():
            record = {"step": self.step + 1, "loss": float(loss.detach()), "lr": self.scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm)}
            record.update({k: float(v) for k, v in logs.items()})
            self.history.append(record)
            if self.tracking:
                self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}")
        self.step += 1

    def _stop_requested(self, stop: _StopRequest) -> bool:
        """Whether Ctrl-C asked to stop (on any process: all stop after the same step)."""
        if self.accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _save_interrupted(self, phase: str, snapshot: Optional[Tuple[Any, ...]]) -> None:
        """Save what an interrupt in `phase` left, if it is consistent; say what happened."""
        if phase == "update":
            logger.warning("%s: interrupted while the weights of step %d were being updated; nothing saved, the "
                           "last checkpoint in %s stays the resumable state", self.desc, self.step + 1, self.state_dir)
            return
        if phase == "compute" and snapshot is not None:
            _restore_rng(snapshot, self.accelerator.device)  # the step's draws are made again on resume
        self.save_state()
        logger.warning("%s: interrupted at step %d; state saved to %s (resume with --resume)",
                       self.desc, self.step, self.state_dir)
