"""Stage I mapping network: CLIP image features -> pseudo-word token embeddings.

Two switchable parts:

* **global branch** (SEARLE-style MLP on the pooled image feature):
  D -> hidden -> hidden -> num_tokens x token_dim with GELU and dropout.
* **visual semantic injection (VSI)**: learnable queries, shifted by a
  projection of the pooled feature and of the global tokens (so they know
  *which* image they describe), attend to the frozen CLIP patch tokens through
  small transformer decoder layers (self-attention among queries,
  cross-attention to patches, MLP), so fine detail that the pooled vector
  averages away (colour of a small object, layout) can enter the tokens.

How VSI joins the global tokens (``vsi_mode``):

* ``"concat"`` (default): VSI emits ``vsi_tokens`` extra detail tokens placed
  after the ``num_tokens`` global ones, so ``$`` becomes num_tokens +
  vsi_tokens pseudo words.
* ``"add"``: VSI adds a residual to each of the ``num_tokens`` global tokens.
  Measured on the shapes world (benchmarks/bench_stage1.py), overwriting every
  global token with patch detail made the pseudo words act like a copy of the
  reference image (composed R@10 29.5 against 37.9 for "concat"), because the
  modification text could no longer override them; it is kept as an ablation.

VSI reads the patch tokens average-pooled to ``patch_grid`` x ``patch_grid``
(default 4: 16 tokens; 0: the backbone's full grid), recorded here so the
Stage-I feature cache, Stage II and the Composer pool alike
(``Backbone.encode_image(patch_grid=...)``); other token counts are an error.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..config import Config


@dataclasses.dataclass
class PhiConfig(Config):
    """Sizes and switches of the phi-network."""

    embed_dim: int = 128  # pooled CLIP image feature width (and patch-token width: patches are projected)
    token_dim: int = 128  # token-embedding width of the text tower
    num_tokens: int = 4
    hidden_mult: int = 4
    dropout: float = 0.1
    use_global: bool = True
    use_vsi: bool = True
    vsi_layers: int = 2
    vsi_heads: int = 4
    vsi_width: int = 0  # 0: token_dim
    patch_grid: int = 4  # VSI reads the patch tokens average-pooled to g x g (0: the backbone's full grid)
    vsi_mode: str = "concat"  # "concat": VSI emits vsi_tokens extra detail tokens; "add": VSI refines each global token
    vsi_tokens: int = 2

    # folders written before patch_grid existed load with its default 4: the grid their feature cache pooled to
    DROPPED_FIELDS = {"max_patches": "never read; replaced by patch_grid"}
    # added after the first model folders were written; those load with the defaults (patch_grid 4: the grid
    # their feature cache pooled to; vsi_mode "concat" with 2 VSI tokens: the only layout there was)
    OPTIONAL_FIELDS = ("patch_grid", "vsi_mode", "vsi_tokens")

    def __post_init__(self) -> None:
        if not isinstance(self.patch_grid, int) or self.patch_grid < 0:
            raise ValueError(f"patch_grid must be an int >= 0 (0: the backbone's full grid), got {self.patch_grid!r}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.vsi_mode not in ("concat", "add"):
            raise ValueError(f"vsi_mode must be 'concat' or 'add', got {self.vsi_mode!r}")
        if self.use_vsi and self.vsi_mode == "concat" and self.vsi_tokens < 1:
            raise ValueError(f"vsi_tokens must be >= 1 with vsi_mode='concat', got {self.vsi_tokens}")
        if not (self.use_global or self.use_vsi):
            raise ValueError("phi needs the global branch, VSI, or both (use_global and use_vsi are both False)")

    @property
    def total_tokens(self) -> int:
        """Number of pseudo words that replace the placeholder."""
        concat = self.use_vsi and self.vsi_mode == "concat"
        return self.vsi_tokens + (self.num_tokens if self.use_global else 0) if concat else self.num_tokens


class _DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention to patches, MLP."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ln_q = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Update queries q [B, n, w] from memory kv [B, N, w]."""
        h = self.ln_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.ln_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.ln_mlp(q))


class PhiNetwork(nn.Module):
    """Maps pooled image features [B, D] (+ patch tokens [B, N, D]) to pseudo tokens [B, n, token_dim]."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.config = c = config
        # patch tokens VSI expects per image (g*g); the Composer sets it for patch_grid 0 from its backbone's grid
        self.patch_count: Optional[int] = c.patch_grid ** 2 if c.patch_grid else None
        hidden = c.hidden_mult * c.embed_dim
        out_tokens = 1 if c.use_vsi and c.vsi_mode == "add" else c.num_tokens
        if c.use_global:
            self.global_mlp = nn.Sequential(
                nn.Linear(c.embed_dim, hidden), nn.GELU(), nn.Dropout(c.dropout),
                nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(c.dropout),
                nn.Linear(hidden, out_tokens * c.token_dim),
            )
        if c.use_vsi:
            w = c.vsi_width or c.token_dim
            nq = c.vsi_tokens if c.vsi_mode == "concat" else c.num_tokens
            self.queries = nn.Parameter(torch.randn(nq, w) * 0.02)
            self.patch_proj = nn.Sequential(nn.Linear(c.embed_dim, w), nn.LayerNorm(w))
            self.pooled_proj = nn.Linear(c.embed_dim, w)
            self.layers = nn.ModuleList(_DecoderLayer(w, c.vsi_heads, c.dropout) for _ in range(c.vsi_layers))
            self.ln_out = nn.LayerNorm(w)
            self.out = nn.Linear(w, c.token_dim)
            if c.use_global:
                self.condition = nn.Linear(c.token_dim, w)

    def forward(self, pooled: torch.Tensor, patches: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pseudo tokens [B, total_tokens, token_dim]."""
        c = self.config
        b = pooled.shape[0]
        g = self.global_mlp(pooled).view(b, -1, c.token_dim) if c.use_global else None
        if not c.use_vsi:
            return g
        if patches is None:
            raise ValueError("phi with visual semantic injection needs the patch tokens (got patches=None)")
        if self.patch_count is not None and patches.shape[1] != self.patch_count:
            raise ValueError(
                f"phi reads {self.patch_count} patch tokens per image (phi config patch_grid={c.patch_grid}) but got "
                f"{patches.shape[1]}: pool them with Backbone.encode_image(patch_grid=...) "
                "(Composer.image_features does)"
            )
        kv = self.patch_proj(patches)
        q = self.queries.unsqueeze(0).expand(b, -1, -1) + self.pooled_proj(pooled).unsqueeze(1)
        if g is not None:
            q = q + self.condition(g.mean(1, keepdim=True) if c.vsi_mode == "concat" else g)
        for layer in self.layers:
            q = layer(q, kv)
        tokens = self.out(self.ln_out(q))
        if g is None:
            return tokens
        return torch.cat([g, tokens], 1) if c.vsi_mode == "concat" else tokens + g

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        c = self.config
        vsi = f"{c.vsi_mode} x{c.vsi_layers}" if c.use_vsi else "off"
        return (f"PhiNetwork(tokens={c.total_tokens}, global={c.use_global}, vsi={vsi}, params={n / 1e6:.2f}M)")
