"""Stage II composing adapters inside the frozen CLIP text transformer.

Two kinds, chosen in :class:`AdapterConfig` and registered in ``ADAPTER_KINDS``:

* ``bottleneck``: after the attention and/or MLP sub-layer of each adapted
  block, x <- x + up(GELU(down(LN(x)))) with width ``rank``; ``up`` is zero
  initialised, so the block is unchanged before training.
* ``lora``: low-rank updates W <- W + (alpha / rank) * B A on the attention
  input/output projections and/or the MLP projections (torch parametrizations,
  so open_clip's own forward code runs unchanged); B is zero initialised.
  ``dropout`` drops whole rank components of the update in training mode (one
  mask per forward pass: the update is folded into the weight, so it cannot
  drop per-token inputs as LoRA on a plain linear layer does). :func:`merge_adapters`
  folds the updates into the base weights for deployment.

``full`` fine-tunes the whole of the last N blocks instead (an ablation row,
not an adapter). Adapters go into the last ``num_layers`` blocks; everything
else stays frozen. :func:`adapters_disabled` switches LoRA and bottleneck
updates off for a while, so plain text can be encoded by frozen CLIP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import Config
from ..registry import Registry

ADAPTER_KINDS: Registry = Registry("adapter kind")


@dataclasses.dataclass
class AdapterConfig(Config):
    """Where and which composing adapters go into the text transformer."""

    kind: str = "lora"  # "lora", "bottleneck" or "full" (LoRA won the ablation in benchmarks/bench_stage2.py)
    num_layers: int = 4  # the last N text blocks get adapters
    rank: int = 16
    alpha: float = 16.0  # LoRA scaling numerator
    targets: Tuple[str, ...] = ("attn", "mlp")  # sub-layers that get adapters
    dropout: float = 0.0  # bottleneck: on the hidden units; LoRA: on the rank components (training mode only)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; choose one of {ADAPTER_KINDS.names()}")
        bad = [t for t in self.targets if t not in ("attn", "mlp")]
        if bad:
            raise ValueError(f"adapter targets must be 'attn' and/or 'mlp', got {bad}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1], got {self.dropout}")


class Bottleneck(nn.Module):
    """x -> up(GELU(down(LN(x)))), zero at initialisation."""

    def __init__(self, width: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's residual update."""
        return self.up(self.drop(nn.functional.gelu(self.down(self.ln(x)))))


class BottleneckBlock(nn.Module):
    """An open_clip ResidualAttentionBlock with bottleneck adapters after attention and/or MLP."""

    def __init__(self, block: nn.Module, cfg: AdapterConfig) -> None:
        super().__init__()
        self.block = block
        width = block.ln_1.normalized_shape[0]
        self.adapter_attn = Bottleneck(width, cfg.rank, cfg.dropout) if "attn" in cfg.targets else None
        self.adapter_mlp = Bottleneck(width, cfg.rank, cfg.dropout) if "mlp" in cfg.targets else None
        self.enabled = True  # False: the wrapped block alone (frozen CLIP text)

    def get_weight_dtype(self) -> torch.dtype:
        """Weight dtype of the wrapped block (open_clip asks the first block for the cast dtype)."""
        return self.block.get_weight_dtype()

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask=None) -> torch.Tensor:
        """Same signature and result as the wrapped block, plus the adapters' residuals."""
        b = self.block
        if not self.enabled:
            return b(q_x, attn_mask=attn_mask)
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), attn_mask=attn_mask))
        if self.adapter_attn is not None:
            x = x + self.adapter_attn(x)
        x = x + b.ls_2(b.mlp(b.ln_2(x)))
        if self.adapter_mlp is not None:
            x = x + self.adapter_mlp(x)
        return x


class LoRADelta(nn.Module):
    """Parametrization W -> W + scale * B @ A (B zero-initialised); in training, rank components drop with `dropout`."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = dropout
        self.enabled = True  # False: the base weight alone (frozen CLIP text)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The adapted weight."""
        if not self.enabled:
            return weight
        b = self.lora_b
        if self.training and self.dropout > 0:  # at 0 nothing is drawn: the default keeps the plain LoRA numerics
            keep = torch.ones(b.shape[1], device=b.device, dtype=b.dtype)
            b = b * nn.functional.dropout(keep, self.dropout, training=True)
        return weight + self.scale * (b @ self.lora_a).to(weight.dtype)


def _blocks(text_transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(text_transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise TypeError("adapters need an open_clip text Transformer with .resblocks")
    return blocks


@ADAPTER_KINDS.register("bottleneck")
def _add_bottleneck(blocks: nn.ModuleList, index: int, cfg: AdapterConfig) -> None:
    # new modules take the train/eval mode of the block they go into
    blocks[index] = BottleneckBlock(blocks[index], cfg).train(blocks[index].training)


@ADAPTER_KINDS.register("lora")
def _add_lora(blocks: nn.ModuleList, index: int, cfg: AdapterConfig) -> None:
    block = blocks[index]
    targets: List[Tuple[nn.Module, str]] = []
    if "attn" in cfg.targets:
        targets += [(block.attn, "in_proj_weight"), (block.attn.out_proj, "weight")]
    if "mlp" in cfg.targets:
        targets += [(block.mlp.c_fc, "weight"), (block.mlp.c_proj, "weight")]
    for module, name in targets:
        out_f, in_f = getattr(module, name).shape
        delta = LoRADelta(out_f, in_f, cfg.rank, cfg.alpha, cfg.dropout).train(module.training)
        parametrize.register_parametrization(module, name, delta)


@ADAPTER_KINDS.register("full")
def _unfreeze_block(blocks: nn.ModuleList, index: int, cfg: AdapterConfig) -> None:
    for p in blocks[index].parameters():
        p.requires_grad_(True)


def add_adapters(text_transformer: nn.Module, cfg: AdapterConfig) -> List[str]:
    """Insert adapters into the last ``cfg.num_layers`` blocks; return the names of the new trainable parameters."""
    blocks = _blocks(text_transformer)
    if not 1 <= cfg.num_layers <= len(blocks):
        raise ValueError(f"num_layers={cfg.num_layers} but the text transformer has {len(blocks)} blocks")
    before = {id(p) for p in text_transformer.parameters() if p.requires_grad}
    for index in range(len(blocks) - cfg.num_layers, len(blocks)):
        ADAPTER_KINDS.get(cfg.kind)(blocks, index, cfg)
    names = []
    for name, p in text_transformer.named_parameters():
        if cfg.kind != "full":
            p.requires_grad_(_is_adapter_param(name))
        if p.requires_grad and id(p) not in before:
            names.append(name)
    return names


def _is_adapter_param(name: str) -> bool:
    return ".adapter_" in name or "lora_" in name


def merge_adapters(text_transformer: nn.Module) -> int:
    """Fold every LoRA update into its base weight (for deployment); return how many weights were folded.

    The merged weights are the adapted weights of eval mode, so outputs do not
    change; the LoRA parameters are gone afterwards. Bottleneck adapters are
    non-linear and cannot be folded (ValueError); ``full`` blocks and an
    already merged transformer have nothing to fold (0).
    """
    if any(isinstance(m, BottleneckBlock) for m in text_transformer.modules()):
        raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights; "
                         "only LoRA adapters can")
    folded = 0
    for module in list(text_transformer.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            plist = module.parametrizations[name]
            if not any(isinstance(p, LoRADelta) for p in plist):
                continue
            plist.eval()  # no dropout in the folded weight
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            folded += 1
    return folded


@contextlib.contextmanager
def adapters_disabled(text_transformer: nn.Module) -> Iterator[int]:
    """Within the block, LoRA and bottleneck updates are off (frozen CLIP text); yields how many were switched."""
    switches = [m for m in text_transformer.modules() if isinstance(m, (LoRADelta, BottleneckBlock))]
    before = [m.enabled for m in switches]
    for m in switches:
        m.enabled = False
    try:
        yield len(switches)
    finally:
        for m, state in zip(switches, before):
            m.enabled = state


def adapter_state(text_transformer: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable adapter tensors (or unfrozen blocks for ``full``), by name."""
    return {n: p.detach() for n, p in text_transformer.named_parameters() if p.requires_grad}


def count_trainable(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
