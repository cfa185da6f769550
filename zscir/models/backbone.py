"""The frozen CLIP backbone: open_clip loading, image features and pseudo-token text encoding.

``load_backbone`` accepts any open_clip model name with a pretrained tag
(``ViT-L-14``/``openai``), a local checkpoint file, a saved backbone folder,
or one of the tiny configs shipped in ``zscir/models/model_configs`` (registered
with open_clip on import, so ``open_clip.create_model("zscir-tiny")`` works).

Text encoding goes through one function, :meth:`Backbone.encode_token_embeddings`,
that mirrors open_clip's causal text tower exactly (pooled at the end-of-text
position) but drops the padding after the longest end-of-text token of the batch:
with a causal mask and end-of-text pooling those positions cannot change the
result, and short prompts then cost a fraction of the full 77-token context.
:meth:`Backbone.encode_with_pseudo_tokens` replaces the token embedding of a
placeholder word (``$``) by given pseudo-token vectors before that function runs.

Patch tokens are average-pooled to a coarser grid by one function,
:func:`pool_patches` (entry point: ``Backbone.encode_image(..., patch_grid=g)``);
the Stage-I feature cache, Stage II and the Composer all go through it with the
grid recorded in phi's config, so phi sees the same tokens in training and use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, load_state_strict, load_tensors, save_folder
from ..config import Config
from .adapters import adapters_disabled

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
BACKBONE_WEIGHTS = "backbone.safetensors"
PLACEHOLDER = "$"
PatchGrid = Union[None, int, Tuple[int, int], Sequence[int]]  # None or 0: the backbone's full grid


def _register_tiny_configs() -> None:
    import open_clip

    if "zscir-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


_register_tiny_configs()


class BackboneError(ValueError):
    """A backbone cannot be loaded or does not support an operation."""


class PromptError(ValueError):
    """A prompt cannot be encoded with pseudo tokens (no placeholder, too long, ...)."""


def resolve_patch_grid(patch_grid: PatchGrid, backbone_grid: Optional[Sequence[int]],
                       what: str = "patch_grid") -> Tuple[int, int]:
    """The (gh, gw) grid to pool patch tokens to: the backbone's for None or 0, else `patch_grid` (never larger)."""
    if backbone_grid is None:
        raise BackboneError(f"{what}: the backbone has no patch grid (not a ViT), so there are no patch tokens to pool")
    bh, bw = int(backbone_grid[0]), int(backbone_grid[1])
    if patch_grid is None or (isinstance(patch_grid, int) and patch_grid == 0):
        return bh, bw
    gh, gw = (patch_grid, patch_grid) if isinstance(patch_grid, int) else tuple(int(g) for g in patch_grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"{what} must be >= 1 (or 0 for the full grid), got {patch_grid}")
    if gh > bh or gw > bw:
        raise BackboneError(f"{what} {gh}x{gw} is larger than the backbone's {bh}x{bw} patch grid "
                            "(pooling cannot upsample)")
    return gh, gw


def pool_patches(patches: torch.Tensor, source_grid: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Average-pool row-major patch tokens [B, gh*gw, D] on `source_grid` to [B, g*g', D] (unchanged when equal)."""
    b, n, d = patches.shape
    gh, gw = int(source_grid[0]), int(source_grid[1])
    if n != gh * gw:
        raise BackboneError(f"got {n} patch tokens, expected {gh}x{gw} = {gh * gw} (row-major grid)")
    grid = (int(grid[0]), int(grid[1]))
    if grid == (gh, gw):
        return patches  # no pooling: bit-identical to the backbone's tokens
    x = patches.reshape(b, gh, gw, d).permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x.float(), grid)  # float32 sums also for half-precision tokens
    return x.permute(0, 2, 3, 1).reshape(b, grid[0] * grid[1], d).to(patches.dtype)


@dataclasses.dataclass
class BackboneConfig(Config):
    """Which CLIP to load: an open_clip model name plus a pretrained tag or file."""

    model_name: str = "zscir-tiny"
    pretrained: Optional[str] = None
    model_cfg: Optional[Dict[str, Any]] = None  # full open_clip config, for architectures not registered

    COMPLETE = True  # a backbone folder's config.json names every field


@dataclasses.dataclass
class ImageFeatures:
    """Pooled image embedding [B, D] and projected patch tokens [B, N, D] (None for non-ViT towers)."""

    pooled: torch.Tensor
    patches: Optional[torch.Tensor]


@dataclasses.dataclass
class _TextTower:
    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: torch.Tensor
    pool_type: str
    eos_id: Optional[int]


def _text_tower(model: nn.Module, name: str) -> _TextTower:
    """Locate the parts of open_clip's text tower; fail clearly where it is not a causal CLIP text transformer."""
    import open_clip
    from open_clip.transformer import TextTransformer

    if isinstance(model, open_clip.CLIP):
        src, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(getattr(model, "text", None), TextTransformer):
        src, pool, eos = model.text, model.text.pool_type, getattr(model.text, "eos_id", None)
        if src.cls_emb is not None or getattr(src, "use_pad_mask", False):
            raise BackboneError(f"{name}: text towers with a class token or padding mask (CoCa-style) are not supported")
    else:
        raise BackboneError(
            f"{name}: unsupported text tower {type(getattr(model, 'text', model)).__name__}; "
            "zscir needs open_clip's causal TextTransformer (CLIP/ViT models)"
        )
    if src.attn_mask is None:
        raise BackboneError(f"{name}: the text tower has no causal mask; pseudo-token encoding needs a causal CLIP text tower")
    if pool not in ("argmax", "eos"):
        raise BackboneError(f"{name}: text pool type {pool!r} is not supported (need 'argmax' or 'eos')")
    return _TextTower(
        src.token_embedding, src.positional_embedding, src.transformer, src.ln_final,
        src.text_projection, src.attn_mask, pool, eos,
    )


class Backbone(nn.Module):
    """A frozen open_clip model with the feature and prompt-encoding functions zscir needs."""

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: Any, config: BackboneConfig) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.config = config
        self._text = _text_tower(model, config.model_name)
        self.context_length = int(self._text.positional_embedding.shape[0])
        self.token_dim = int(self._text.token_embedding.weight.shape[1])
        self.embed_dim = int(_embed_dim(model))
        visual = model.visual
        size = getattr(visual, "image_size", None) or (224, 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        grid = getattr(visual, "grid_size", None)
        self.patch_grid: Optional[Tuple[int, int]] = tuple(int(g) for g in grid) if grid is not None else None
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._placeholder_ids: Dict[str, int] = {}
        self._fingerprint: Optional[str] = None
        # composing adapters in the text transformer (Composer.add_adapters records them): plain text skips them
        self.text_adapter_kind: Optional[str] = None
        self.text_adapters_merged = False
        self.frozen_text_blocks: Optional[Dict[int, nn.Module]] = None  # kind "full": the original blocks

    # ----------------------------------------------------------------- identity
    @property
    def cache_key(self) -> str:
        """A short id of architecture + weights, for feature caches."""
        if self._fingerprint is None:
            h = hashlib.sha1(self.config.model_name.encode())
            for key, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                h.update(key.encode())
                h.update(str(tuple(tensor.shape)).encode())
                sample = torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy()
                h.update(sample.tobytes())
            self._fingerprint = f"{self.config.model_name}-{h.hexdigest()[:16]}"
        return self._fingerprint

    def invalidate_cache_key(self) -> None:
        """Forget the weight fingerprint (call after changing the weights)."""
        self._fingerprint = None

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"Backbone(model={self.config.model_name!r}, pretrained={self.config.pretrained!r}, "
            f"params={n / 1e6:.1f}M, embed_dim={self.embed_dim}, token_dim={self.token_dim}, "
            f"image_size={self.image_size}, patch_grid={self.patch_grid}, context_length={self.context_length})"
        )

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self._text.token_embedding.weight.device

    # -------------------------------------------------------------------- image
    def pixels_from_uint8(self, images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """Normalise a uint8 batch [B, H, W, 3] already at the model's image size into model pixels."""
        x = torch.as_tensor(images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp_(0, 1)
        return (x - self.pixel_mean) / self.pixel_std

    def pool_patches(self, patches: torch.Tensor, patch_grid: PatchGrid) -> torch.Tensor:
        """This backbone's full-grid patch tokens [B, N, D] average-pooled to `patch_grid` (None or 0: unchanged)."""
        return pool_patches(patches, self.patch_grid, resolve_patch_grid(patch_grid, self.patch_grid))

    def encode_image(self, pixels: torch.Tensor, with_patches: bool = True,
                     patch_grid: PatchGrid = None) -> ImageFeatures:
        """Pooled embedding and projected patch tokens (pooled to `patch_grid`; None: full grid) of pixels."""
        visual = self.model.visual
        pixels = pixels.to(self.device)
        if not with_patches or not hasattr(visual, "output_tokens"):
            if with_patches:
                raise BackboneError(f"{self.config.model_name}: the vision tower has no patch tokens (ViT needed)")
            return ImageFeatures(self.model.encode_image(pixels), None)
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = previous
        if getattr(visual, "proj", None) is not None:
            tokens = tokens @ visual.proj
        return ImageFeatures(pooled, self.pool_patches(tokens, patch_grid))

    # --------------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, context_length] with open_clip's tokenizer (over-long texts are truncated)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The input token embeddings [B, L, token_dim] of token ids."""
        return self._text.token_embedding(ids.to(self.device))

    def _pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        if self._text.pool_type == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self._text.eos_id).int().argmax(dim=-1)

    def encode_token_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor, buckets: int = 4) -> torch.Tensor:
        """Run the text transformer on input embeddings [B, L, W] and pool at the end-of-text of `ids`.

        Rows are grouped into up to `buckets` length buckets, each cut after its
        longest end-of-text token: with a causal mask, positions after a row's
        end-of-text cannot change its pooled output, so this is exact and skips
        most of the padding.
        """
        ids = ids.to(embeddings.device)
        pos = self._pool_positions(ids)
        n = min(buckets, embeddings.shape[0] // 32)
        if n <= 1:
            return self._encode_trimmed(embeddings, pos)
        order = torch.argsort(pos)
        parts = [self._encode_trimmed(embeddings[idx], pos[idx]) for idx in torch.tensor_split(order, n)]
        return torch.cat(parts)[torch.argsort(order)]

    def _encode_trimmed(self, embeddings: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        t = self._text
        length = int(pos.max().item()) + 1
        cast = t.transformer.get_cast_dtype() if hasattr(t.transformer, "get_cast_dtype") else embeddings.dtype
        x = embeddings[:, :length].to(cast) + t.positional_embedding[:length].to(cast)
        x = t.transformer(x, attn_mask=t.attn_mask[:length, :length])
        x = t.ln_final(x[torch.arange(x.shape[0], device=x.device), pos])
        if t.text_projection is not None:
            x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
        return x

    @contextlib.contextmanager
    def frozen_text(self) -> Iterator[None]:
        """Within the block, the text transformer is frozen CLIP: composing adapters are off."""
        kind = self.text_adapter_kind
        if kind is None:
            yield
            return
        if self.text_adapters_merged:
            raise ValueError("the LoRA adapters were merged into the text encoder and cannot be switched off; "
                             "encode frozen text with a model loaded before merge_adapters()")
        if kind != "full":
            with adapters_disabled(self._text.transformer):
                yield
            return
        if self.frozen_text_blocks is None:
            raise ValueError("this model fine-tuned its text blocks (adapters kind 'full') and its folder holds only "
                             "the fine-tuned blocks, so frozen CLIP text is not available; use kind 'lora' or "
                             "'bottleneck', or encode with adapted=True")
        blocks = self._text.transformer.resblocks
        tuned = {i: blocks[i] for i in self.frozen_text_blocks}
        try:
            for i, block in self.frozen_text_blocks.items():
                blocks[i] = block.to(self.device)
            yield
        finally:
            for i, block in tuned.items():
                blocks[i] = block

    def encode_text(self, texts: Union[Sequence[str], torch.Tensor], normalize: bool = False,
                    adapted: bool = False) -> torch.Tensor:
        """Text features [B, D] of strings or token ids: frozen CLIP, or through the adapters with `adapted=True`."""
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        with contextlib.nullcontext() if adapted else self.frozen_text():
            feats = self.encode_token_embeddings(self.token_embeddings(ids), ids)
        return F.normalize(feats, dim=-1) if normalize else feats

    def placeholder_id(self, placeholder: str = PLACEHOLDER) -> int:
        """The single token id of the placeholder word; error if it is not one token."""
        if placeholder not in self._placeholder_ids:
            ids = self.tokenizer([placeholder])[0].tolist()
            special = {ids[0]} | {i for i in ids if i == 0}
            eot = max(ids)
            body = [i for i in ids[1:] if i not in special and i != eot]
            if len(body) != 1:
                raise PromptError(f"placeholder {placeholder!r} is not a single token of this tokenizer (got {body})")
            self._placeholder_ids[placeholder] = body[0]
        return self._placeholder_ids[placeholder]

    def encode_with_pseudo_tokens(
        self,
        prompts: Union[str, Sequence[str]],
        pseudo_tokens: torch.Tensor,
        placeholder: str = PLACEHOLDER,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Encode prompts whose placeholder word is replaced by pseudo-token vectors [B, n, token_dim] (or [B, token_dim]).

        Every occurrence of the placeholder in a prompt is expanded to ``n``
        consecutive slots holding the n pseudo tokens of that row.
        """
        if pseudo_tokens.ndim == 2:
            pseudo_tokens = pseudo_tokens.unsqueeze(1)
        if pseudo_tokens.ndim != 3 or pseudo_tokens.shape[-1] != self.token_dim:
            raise PromptError(
                f"pseudo tokens must be [B, n, {self.token_dim}] (token width of the text tower), got {tuple(pseudo_tokens.shape)}"
            )
        batch, n, _ = pseudo_tokens.shape
        if isinstance(prompts, str):
            prompts = [prompts] * batch
        prompts = list(prompts)
        if len(prompts) != batch:
            raise PromptError(f"{len(prompts)} prompts for {batch} rows of pseudo tokens")
        slots = " ".join([placeholder] * n)
        expanded, occurrences = [], []
        for i, prompt in enumerate(prompts):
            count = prompt.count(placeholder)
            if count == 0:
                raise PromptError(f"prompt {i} has no placeholder {placeholder!r}: {prompt!r}")
            occurrences.append(count)
            expanded.append(prompt.replace(placeholder, f" {slots} "))
        ids = self.tokenize(expanded)
        mask = ids == self.placeholder_id(placeholder)
        found = mask.sum(dim=1)
        wanted = torch.tensor(occurrences, device=found.device) * n
        if not torch.equal(found, wanted):
            bad = int((found != wanted).nonzero()[0, 0])
            raise PromptError(
                f"prompt {bad} does not fit the context length {self.context_length} with {n} pseudo token(s) "
                f"({int(found[bad])} of {int(wanted[bad])} placeholder slots survived truncation): {prompts[bad]!r}"
            )
        slot = (mask.cumsum(dim=1) - 1).clamp_min(0) % n  # which pseudo token each slot takes
        fill = torch.gather(
            pseudo_tokens.to(self.device), 1, slot.unsqueeze(-1).expand(-1, -1, self.token_dim)
        )
        x = self.token_embeddings(ids)
        x = torch.where(mask.unsqueeze(-1), fill.to(x.dtype), x)
        feats = self.encode_token_embeddings(x, ids)
        return F.normalize(feats, dim=-1) if normalize else feats

    # ----------------------------------------------------------------- persist
    def save_pretrained(self, folder: Union[str, os.PathLike]) -> Path:
        """Write the backbone's config and full weights to `folder` (atomic)."""
        import open_clip

        cfg = self.config.to_dict()
        cfg["model_cfg"] = cfg.get("model_cfg") or open_clip.get_model_config(self.config.model_name)
        cfg["kind"] = "zscir-backbone"
        return save_folder(folder, cfg, self.model.state_dict(), weights_name=BACKBONE_WEIGHTS)


def _embed_dim(model: nn.Module) -> int:
    visual = model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, torch.Tensor):
        return proj.shape[1]
    out = getattr(visual, "output_dim", None)
    if out:
        return out
    raise BackboneError("cannot determine the embedding width of this model")


_REGISTERED_CONFIGS: Optional[tempfile.TemporaryDirectory] = None


def register_model_config(model_name: str, model_cfg: Dict[str, Any]) -> None:
    """Make an open_clip architecture config (e.g. one stored in a model folder) known under `model_name`."""
    import open_clip

    if model_name in open_clip.list_models():
        return
    if not model_name or any(c in model_name for c in "/\\:") or model_name.startswith("."):
        raise BackboneError(f"cannot register an open_clip config under the name {model_name!r}")
    # open_clip's public registry reads JSON files named after the model; they live as long as the process,
    # since open_clip re-reads every registered path whenever another one is added
    global _REGISTERED_CONFIGS
    if _REGISTERED_CONFIGS is None:
        _REGISTERED_CONFIGS = tempfile.TemporaryDirectory(prefix="zscir-model-configs-")
    path = Path(_REGISTERED_CONFIGS.name) / f"{model_name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
    if model_name not in open_clip.list_models():
        raise BackboneError(f"the open_clip config of {model_name!r} needs embed_dim, vision_cfg and text_cfg")


def _check_hub_backbone(model_name: str, pretrained: Optional[str]) -> None:
    """An ``hf-hub:org/repo`` backbone: its config and weights in the HF cache (or downloaded), else one clear error.

    open_clip itself would go on with random weights when the weights file cannot be fetched; zscir never does.
    """
    from ..hub import HUB_PREFIX, hub_file, is_repo_id

    repo = model_name[len(HUB_PREFIX):]
    if pretrained:
        raise BackboneError(f"{model_name}: an hf-hub: backbone brings its own weights; drop the pretrained tag "
                            f"{pretrained!r}")
    if not is_repo_id(repo) or "/" not in repo:
        raise BackboneError(f"{model_name}: expected hf-hub:org/repo")
    hub_file(repo, "open_clip_config.json", what="backbone")
    try:
        hub_file(repo, "open_clip_model.safetensors", what="backbone")
    except ValueError as err:  # a HubError: maybe the repo only has the older .bin weights
        try:
            hub_file(repo, "open_clip_pytorch_model.bin", what="backbone")
        except ValueError:
            raise err from None


def _create(model_name: str, model_cfg: Optional[Dict[str, Any]], pretrained: Optional[str], device: str):
    import open_clip

    from ..hub import HUB_PREFIX

    if model_name.startswith(HUB_PREFIX):  # open_clip resolves these through huggingface_hub, weights included
        _check_hub_backbone(model_name, pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
        except (RuntimeError, ValueError, OSError) as err:
            raise BackboneError(f"could not load {model_name!r}: {err}") from None
        return model, open_clip.get_tokenizer(model_name), preprocess
    if model_cfg is not None and model_name not in open_clip.list_models():
        register_model_config(model_name, model_cfg)  # a config that came from a saved folder
    if model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        raise BackboneError(
            f"unknown model name {model_name!r}" + (f"; did you mean {close}?" if close else "")
            + " (see open_clip.list_models())"
        )
    root = logging.getLogger()
    level = root.level
    if pretrained is None:  # weights come from our own file (or stay random on purpose): silence open_clip's warning
        root.setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except RuntimeError as err:
        raise BackboneError(f"could not load {model_name!r} with pretrained={pretrained!r}: {err}") from None
    finally:
        root.setLevel(level)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer, preprocess


def _wrap(model: nn.Module, tokenizer: Any, preprocess: Any, config: BackboneConfig, device: str,
          freeze: bool) -> Backbone:
    model.eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return Backbone(model, tokenizer, preprocess, config).to(device)


def create_backbone(config: BackboneConfig, device: str = "cpu", freeze: bool = True) -> Backbone:
    """The architecture `config` names, randomly initialised (no pretrained weights), for callers that load weights."""
    model, tokenizer, preprocess = _create(config.model_name, config.model_cfg, None, device)
    return _wrap(model, tokenizer, preprocess, config, device, freeze)


def _load_weight_file(model: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        # open_clip checkpoints are torch files; weights_only=True uses torch's restricted unpickler (no code runs)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {err}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not contain a state dict")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    load_state_strict(model, state, source=str(path))


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_backbone(
    model_name: str = "zscir-tiny",
    pretrained: Optional[str] = None,
    device: str = "cpu",
    freeze: bool = True,
) -> Backbone:
    """Load a CLIP backbone: a saved backbone folder, or an open_clip name with a pretrained tag / weight file / None (random init)."""
    path = Path(model_name)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"backbone folder {path} has no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{cfg_file}: invalid JSON ({err})") from None
        raw.pop("kind", None)
        for extra in [k for k in raw if k not in {f.name for f in dataclasses.fields(BackboneConfig)}]:
            raw.pop(extra)
        config = BackboneConfig.from_dict(raw, source=str(cfg_file))
        model, tokenizer, preprocess = _create(config.model_name, config.model_cfg, None, device)
        _load_weight_file(model, path / BACKBONE_WEIGHTS)
        config = BackboneConfig(config.model_name, str(path), config.model_cfg)
    else:
        config = BackboneConfig(model_name, pretrained)
        weight_file = Path(pretrained) if pretrained else None
        if weight_file is not None and (weight_file.suffix in (".safetensors", ".pt", ".bin", ".pth") or os.sep in pretrained):
            if not weight_file.is_file():
                raise CheckpointError(f"checkpoint file not found: {weight_file}")
            model, tokenizer, preprocess = _create(model_name, None, None, device)
            _load_weight_file(model, weight_file)
        else:
            model, tokenizer, preprocess = _create(model_name, None, pretrained, device)
    return _wrap(model, tokenizer, preprocess, config, device, freeze)
