"""The contract of a Stage-II component and what it may read (:class:`ComponentContext`).

A component is one switchable part of the Stage-II objective: extra negatives
for the main InfoNCE, per-row loss weights, an additional loss term, trainable
heads that only shape the training signal. The trainer
(:class:`zscir.train.stage2.Stage2Task`) calls every hook below on every
component, in the order the components are listed in ``Stage2Config.components``;
the defaults do nothing.

Per-sample tensors a component needs in its loss are put into ``out`` inside
:meth:`Stage2Component.forward` (so they are all-gathered across processes);
the loss side only reads ``out``, never the (local) ``batch``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ...composer import Composer
from ...config import ConfigError
from ...registry import Registry
from ..features import Corpus, TripletFeatures, text_features

__all__ = ["STAGE2_COMPONENTS", "ComponentContext", "Stage2Component", "check_option", "parse_options"]

STAGE2_COMPONENTS: Registry = Registry("stage-2 component")


@dataclasses.dataclass(eq=False)
class ComponentContext:
    """What a component may read: the run's config and data, the composer, and shared frozen text features."""

    cfg: Any  # the run's Stage2Config
    triplets: TripletFeatures
    corpus: Optional[Corpus] = None
    composer: Optional[Composer] = None  # the composer being trained (adapters inserted)
    encode_queries: Optional[Callable[[], torch.Tensor]] = None  # current query embeddings of every triplet
    _text_features: Optional[torch.Tensor] = dataclasses.field(default=None, init=False, repr=False)

    def text_features(self) -> torch.Tensor:
        """Normalised CLIP text features [N, D] of every triplet's modification text, computed once per run.

        Computed on first use, i.e. before the first optimiser step, when the
        adapters are still zero (bottleneck, LoRA): this is the frozen CLIP text
        feature. (On a composer whose adapters were already trained, e.g. in the
        bank stage, it is the adapted text encoder's feature at the start of the run.)
        A resumed run restores them from the training state (:meth:`set_text_features`)
        instead of re-encoding with the by-then trained adapters.
        """
        if self._text_features is None:
            self._text_features = text_features(self.composer.backbone, self.triplets.modifications)
        return self._text_features

    def cached_text_features(self) -> Optional[torch.Tensor]:
        """The text features if they were computed (or restored), else None."""
        return self._text_features

    def set_text_features(self, features: torch.Tensor) -> None:
        """Restore text features saved with a training state."""
        self._text_features = features.float()

    def queries(self) -> torch.Tensor:
        """Current query embeddings of every triplet (for mining)."""
        if self.encode_queries is None:
            raise ValueError("this component context has no query encoder")
        return self.encode_queries()


class Stage2Component:
    """A pluggable part of the Stage-II objective (negatives, weights, extra losses)."""

    name = "component"
    needs_query_negatives = False  # the batch must carry query-side negatives (another triplet's modification)
    uses_text_features = False  # reads ctx.text_features() (saved once with the training state)

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        self.ctx = ctx
        self.options = options

    def modules(self) -> Dict[str, nn.Module]:
        """Trainable sub-modules this component adds (trained with the adapters)."""
        return {}

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Add inputs to this rank's ``batch`` (built from triplet ``indices``) before the forward pass."""

    def forward(self, module: nn.Module, batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Add per-sample outputs to ``out`` inside the module's forward (runs sharded per rank)."""

    def extra_negatives(self, out: Dict[str, torch.Tensor],
                        batch: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Per-row extra negative features [B, M, D] and a drop-mask [B, M], for the main InfoNCE."""
        return None

    def sample_weights(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Per-row loss weights [B] (multiplied together across components)."""
        return None

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """An additional loss term (already weighted) and logs."""
        return None, {}

    def on_step_end(self, step: int) -> None:
        """Hook after each optimiser step."""

    def state(self) -> Dict[str, torch.Tensor]:
        """Non-parameter tensors to checkpoint."""
        return {}

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state`."""


def parse_options(cls: type, name: str, options: Dict[str, Any]) -> Any:
    """A component's options dataclass from its ``component_options`` dict (unknown keys name the component)."""
    if not isinstance(options, dict):
        raise ConfigError(f"component_options[{name!r}]: expected a dict of options, got {type(options).__name__}")
    try:
        return cls.from_dict(dict(options), source=f"component_options[{name!r}]")
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # bad values surface from the options' __post_init__ checks
        raise ConfigError(f"component_options[{name!r}]: {err}") from None


def check_option(condition: bool, name: str, message: str) -> None:
    """Raise a ConfigError naming component ``name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"component_options[{name!r}]: {message}")
