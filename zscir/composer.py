"""The user-facing model: reference image + modification text -> query embedding.

>>> from zscir import Composer
>>> composer = Composer.from_clip("zscir-tiny")              # random tiny CLIP, untrained phi (offline)
>>> from PIL import Image
>>> ref = Image.new("RGB", (64, 64), "red")
>>> q = composer.encode_query([ref], ["make it blue"])        # [1, D], L2-normalised
>>> g = composer.encode_images([ref, Image.new("RGB", (64, 64), "blue")])
>>> scores, idx = composer.search(ref, "make it blue", g, k=2)
>>> tuple(q.shape), tuple(idx.shape)
((1, 128), (1, 2))

A model folder holds ``config.json`` (a :class:`ComposerConfig`),
``model.safetensors`` with the phi-network, the composing adapters and, for
backbones that are not a public open_clip checkpoint (the tiny CLIP trained
here), the backbone weights too, and a model card ``README.md`` (Hub metadata,
training data, evaluation results). Public backbones (``ViT-L-14``/``openai``,
``hf-hub:org/repo``) are referenced by name and loaded through open_clip.
:meth:`Composer.from_pretrained` takes a folder or a Hub repo id (``user/repo``,
resolved through ``huggingface_hub``'s cache, offline mode and token);
:meth:`Composer.push_to_hub` uploads one.

Adapters are attached in one place, :meth:`Composer.add_adapters` (the
constructor, ``from_pretrained`` and Stage II all go through it). Only composed
queries go through them: plain text (:meth:`Composer.encode_texts`, baselines,
training targets) is encoded by frozen CLIP inside :meth:`Composer.frozen_text`
unless a caller asks for the adapted encoder.
:meth:`Composer.merge_adapters` folds LoRA adapters into the text encoder for
deployment; a merged Composer encodes exactly as before but cannot be saved
(save first, merge after loading).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import CheckpointError, load_folder, save_folder
from .config import Config
from .hub import HUB_PREFIX, CardInfo, read_card_info, resolve_model_folder, validate_repo_id, write_model_card
from .models import adapters as _adapters
from .models.adapters import AdapterConfig
from .models.backbone import (Backbone, BackboneConfig, BackboneError, create_backbone, load_backbone,
                              resolve_patch_grid)
from .models.phi import PhiConfig, PhiNetwork

ImageInput = Union[Image.Image, str, os.PathLike, torch.Tensor, np.ndarray]


@dataclasses.dataclass
class ComposerConfig(Config):
    """Everything needed to rebuild a Composer: backbone reference, phi, adapters, prompts."""

    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    phi: PhiConfig = dataclasses.field(default_factory=PhiConfig)
    adapters: Optional[AdapterConfig] = None
    query_prompt: str = "a photo of $ that {modification}"
    placeholder: str = "$"
    embed_backbone: bool = False  # backbone weights stored in the folder (local/tiny backbones)
    image_residual: bool = False  # query = normalise(composed + w * reference image), w learned in Stage II
    stage: str = "untrained"  # "untrained", "stage1", "stage2"

    DROPPED_FIELDS = {"image_prompt": "never used by any code path; removed in the layout refactor"}
    # config.json of a model folder is written whole: a missing field is an error (a lost custom prompt must not
    # silently become the default), except fields added after the first folders were written
    COMPLETE = True
    OPTIONAL_FIELDS = ("image_residual",)


def phi_patch_grid(phi: PhiConfig, backbone: Backbone, source: str = "phi config") -> Optional[Tuple[int, int]]:
    """The grid phi's VSI reads on this backbone (None without VSI); a clear error when the backbone cannot give it."""
    if not phi.use_vsi:
        return None
    grid = backbone.patch_grid
    try:
        return resolve_patch_grid(phi.patch_grid, grid, what="phi.patch_grid")
    except BackboneError:
        have = "no patch grid (not a ViT)" if grid is None else f"a {grid[0]}x{grid[1]} patch grid"
        want = "the full patch grid" if phi.patch_grid == 0 else f"{phi.patch_grid}x{phi.patch_grid}"
        raise BackboneError(
            f"{source}: phi reads patch tokens pooled to {want} (phi.patch_grid={phi.patch_grid}), but backbone "
            f"{backbone.config.model_name!r} has {have}; use the backbone phi was trained with, or a phi trained "
            "with a patch grid this backbone can give (train-stage1 --patch-grid)"
        ) from None


class Composer(nn.Module):
    """Frozen CLIP + phi-network (+ composing adapters): encodes images and composed queries."""

    def __init__(self, backbone: Backbone, phi: PhiNetwork, config: ComposerConfig) -> None:
        super().__init__()
        grid = phi_patch_grid(phi.config, backbone)
        if grid is not None:
            phi.patch_count = grid[0] * grid[1]
        self.backbone = backbone
        self.phi = phi
        self.config = config
        self.residual_weight: Optional[nn.Parameter] = None
        if config.image_residual:
            self.enable_image_residual()
        self.adapter_keys: List[str] = []
        #: what the model card records (training data, data sets, results); carried into the next save
        self.card: CardInfo = {}
        adapters, config.adapters = config.adapters, None  # add_adapters records them again
        try:
            if adapters is not None:
                self.add_adapters(adapters)
        finally:
            config.adapters = adapters
        self.eval()

    # ------------------------------------------------------------ factories
    @classmethod
    def from_clip(cls, model_name: str = "zscir-tiny", pretrained: Optional[str] = None,
                  phi: Optional[PhiConfig] = None, adapters: Optional[AdapterConfig] = None,
                  device: str = "cpu", **prompt_kwargs) -> "Composer":
        """A Composer over an open_clip model (name + pretrained tag/file, ``hf-hub:org/repo``, or a backbone folder)
        with an untrained phi."""
        backbone = load_backbone(model_name, pretrained, device=device)
        phi_cfg = dataclasses.replace(phi or PhiConfig(), embed_dim=backbone.embed_dim, token_dim=backbone.token_dim)
        if model_name.startswith(HUB_PREFIX):  # config and weights come from the Hub repo: referenced by name
            config = ComposerConfig(backbone=backbone.config, phi=phi_cfg, adapters=adapters, **prompt_kwargs)
            return cls(backbone, PhiNetwork(phi_cfg), config).to(device)
        local = Path(model_name).is_dir() or (pretrained is not None and Path(pretrained).exists())
        bcfg = backbone.config
        if (local or pretrained is None) and bcfg.model_cfg is None:
            import open_clip

            bcfg = dataclasses.replace(bcfg, model_cfg=open_clip.get_model_config(bcfg.model_name))
        config = ComposerConfig(backbone=bcfg, phi=phi_cfg, adapters=adapters,
                                embed_backbone=bool(local or pretrained is None), **prompt_kwargs)
        return cls(backbone, PhiNetwork(phi_cfg), config).to(device)

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], device: str = "cpu", revision: Optional[str] = None,
                        token: Optional[str] = None, cache_dir: Optional[Union[str, os.PathLike]] = None) -> "Composer":
        """Load a model folder or Hub repo id (at `revision`) written by :meth:`save_pretrained` / :meth:`push_to_hub`.

        Loading is strict: missing or mismatched weights are an error. Repo ids go through ``huggingface_hub``
        (its cache, ``HF_HUB_OFFLINE``, `token` or the logged-in one; `cache_dir` overrides the cache folder).
        """
        folder = resolve_model_folder(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        raw, tensors = load_folder(folder)
        config = ComposerConfig.from_dict(raw, source=str(Path(folder) / "config.json"))
        bcfg = config.backbone
        if config.embed_backbone:
            backbone = create_backbone(bcfg, device=device)  # weights come from the folder below
        else:
            backbone = load_backbone(bcfg.model_name, bcfg.pretrained, device=device)
        phi_patch_grid(config.phi, backbone, source=f"model folder {folder}")  # before any weights are read
        composer = cls(backbone, PhiNetwork(config.phi), config).to(device)  # adapters: via add_adapters
        own = composer._persistent_state()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        bad_shape = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
        if missing or unexpected or bad_shape:
            raise CheckpointError(
                f"{folder}: weights do not match config.json: missing {missing[:3]} ({len(missing)}), "
                f"unexpected {unexpected[:3]} ({len(unexpected)}), shape mismatch {bad_shape[:3]}"
            )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(tensors[k].to(v.dtype))
        if config.embed_backbone:
            composer.backbone.frozen_text_blocks = None  # the folder holds the fine-tuned blocks, not the originals
        composer.backbone.invalidate_cache_key()
        composer.card = read_card_info(folder)
        return composer

    def _persistent_state(self) -> Dict[str, torch.Tensor]:
        """Tensors a model folder stores: phi, adapters, and the backbone if embedded."""
        state: Dict[str, torch.Tensor] = {f"phi.{k}": v for k, v in self.phi.state_dict().items()}
        if self.residual_weight is not None:
            state["residual_weight"] = self.residual_weight.data
        adapter_keys = set(self.adapter_keys)
        for k, v in self.backbone.model.state_dict().items():
            if self.config.embed_backbone or k in adapter_keys:
                state[f"backbone.{k}"] = v
        return state

    def save_pretrained(self, folder: Union[str, os.PathLike], training_data: Optional[Dict[str, str]] = None,
                        results: Optional[Sequence[Dict]] = None, datasets: Sequence[str] = (),
                        model_card: bool = True, name: Optional[str] = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (atomic; loads back bit-exactly) and the model card.

        The card (``README.md``) records the backbone, `training_data` ({stage: one-line summary}), Hub
        `datasets` ids and evaluation `results` (dicts with dataset, split, metrics, as ``zscir eval`` writes
        them), added to what this model's card already held; `name` titles the card (default: the folder's name).
        """
        if self.merged:
            raise ValueError("this Composer's LoRA adapters were merged into the text encoder, which a model folder "
                             "cannot describe; save before merge_adapters() and merge again after loading")
        config = self.config.to_dict()
        out = save_folder(folder, config, self._persistent_state())
        if model_card:
            # entries of a card already in the folder stay, then this model's, then the new ones
            write_model_card(out, config, training_data={**(self.card.get("training_data") or {}),
                                                         **(training_data or {})},
                             results=list(self.card.get("results") or []) + list(results or []),
                             datasets=list(self.card.get("datasets") or []) + list(datasets), name=name)
            self.card = read_card_info(out)
        return out

    def push_to_hub(self, repo_id: str, revision: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, commit_message: str = "Upload zscir model", create_pr: bool = False,
                    training_data: Optional[Dict[str, str]] = None, results: Optional[Sequence[Dict]] = None,
                    datasets: Sequence[str] = ()) -> str:
        """Save this model (with its card) and upload it to the Hub repo `repo_id` (created if needed); the commit URL.

        `revision` is the branch to commit to (created from main if missing); `private` applies when the repo is
        created; `token` defaults to the logged-in one (``huggingface-cli login`` or ``HF_TOKEN``).
        """
        import tempfile

        validate_repo_id(repo_id)
        if self.merged:
            raise ValueError("this Composer's LoRA adapters were merged into the text encoder; push the model "
                             "before merge_adapters()")
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="zscir-push-") as tmp:
            self.save_pretrained(tmp, training_data=training_data, results=results, datasets=datasets,
                                 name=repo_id.rpartition("/")[2])
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message, create_pr=create_pr)
        return str(getattr(info, "commit_url", info))

    # -------------------------------------------------------------- adapters
    def add_adapters(self, config: AdapterConfig) -> List[str]:
        """Insert composing adapters into the text transformer (once); return the new trainable parameter names."""
        if self.config.adapters is not None:
            a = self.config.adapters
            raise ValueError(f"this composer already has adapters ({a.kind} x{a.num_layers} rank {a.rank}); "
                             "adapters can be added once")
        prefix, text_transformer = self._text_transformer()
        if config.kind == "full":  # it changes the text blocks themselves: keep the originals for frozen text
            blocks = text_transformer.resblocks
            self.backbone.frozen_text_blocks = {i: copy.deepcopy(blocks[i]).requires_grad_(False)
                                                for i in range(len(blocks) - config.num_layers, len(blocks))}
        names = _adapters.add_adapters(text_transformer, config)
        self.backbone.text_adapter_kind = config.kind
        text_transformer.to(self.device)  # new adapter weights are created on the CPU
        self.adapter_keys = [f"{prefix}.{n}" for n in names]
        self.config.adapters = config
        self.backbone.invalidate_cache_key()
        return list(self.adapter_keys)

    def merge_adapters(self) -> int:
        """Fold LoRA adapters into the text encoder's weights for deployment; return how many weights were folded."""
        folded = _adapters.merge_adapters(self._text_transformer()[1])
        if folded:
            self.backbone.text_adapters_merged = True
            self.adapter_keys = []  # the LoRA parameters are gone
            self.backbone.invalidate_cache_key()
        return folded

    @property
    def merged(self) -> bool:
        """Whether LoRA was folded into the text encoder (merge_adapters): it encodes but cannot be saved."""
        return self.backbone.text_adapters_merged

    def frozen_text(self) -> ContextManager[None]:
        """Within the block, the text encoder is frozen CLIP: composing adapters are off."""
        return self.backbone.frozen_text()

    def _text_transformer(self) -> Tuple[str, nn.Module]:
        """Where the text transformer sits in the open_clip model (its state-dict prefix) and the module."""
        model = self.backbone.model
        prefix = "transformer" if hasattr(model, "transformer") else "text.transformer"
        return prefix, model.get_submodule(prefix)

    # -------------------------------------------------------------- encoding
    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.backbone.device

    @property
    def cache_key(self) -> str:
        """Identifies backbone weights + image pipeline, for gallery feature caches."""
        return f"{self.backbone.cache_key}-{self.backbone.image_size}"

    def _pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        from .data.images import load_image

        out = []
        for img in images:
            if isinstance(img, torch.Tensor) and img.ndim == 3:
                out.append(img)
                continue
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            elif not isinstance(img, Image.Image):
                img = load_image(img)
            out.append(self.backbone.preprocess(img.convert("RGB")))
        return torch.stack(out).to(self.device)

    def image_features(self, images: Sequence[ImageInput]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raw pooled features and the patch tokens phi reads (pooled to its grid; None without VSI) of images."""
        return self.pixel_features(self._pixels(images))

    def pixel_features(self, pixels: torch.Tensor, with_patches: Optional[bool] = None
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pooled features and patch tokens (pooled to phi's grid) of model pixels [B, 3, H, W]."""
        with_patches = self.phi.config.use_vsi if with_patches is None else with_patches
        feats = self.backbone.encode_image(pixels, with_patches=with_patches, patch_grid=self.phi.config.patch_grid)
        return feats.pooled, feats.patches

    def phi_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The backbone's full-grid patch tokens [B, N, D] pooled to the grid phi reads."""
        return self.backbone.pool_patches(patches, self.phi.config.patch_grid)

    def pseudo_tokens(self, pooled: torch.Tensor, patches: Optional[torch.Tensor]) -> torch.Tensor:
        """Pseudo-word tokens [B, n, token_dim] of image features."""
        return self.phi(pooled, patches)

    def query_prompts(self, texts: Sequence[str]) -> List[str]:
        """Fill the query prompt template with each modification text (placeholder characters in user text removed)."""
        ph = self.config.placeholder
        return [self.config.query_prompt.format(modification=t.replace(ph, " ").strip()) for t in texts]

    def compose_features(self, pooled: torch.Tensor, patches: Optional[torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised query embeddings from image features and modification texts."""
        return self.compose_tokens(self.pseudo_tokens(pooled, patches), pooled, texts)

    def compose_tokens(self, tokens: torch.Tensor, pooled: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised query embeddings from pseudo tokens (+ the reference feature when the residual is on)."""
        q = self.backbone.encode_with_pseudo_tokens(self.query_prompts(texts), tokens, self.config.placeholder,
                                                    normalize=True)
        if self.residual_weight is None:
            return q
        return F.normalize(q + self.residual_weight * F.normalize(pooled, dim=-1), dim=-1)

    def enable_image_residual(self) -> None:
        """Add the (zero-initialised, so initially inert) reference-image residual to the query."""
        if self.residual_weight is None:
            self.residual_weight = nn.Parameter(torch.zeros((), device=self.device), requires_grad=False)
            self.config.image_residual = True

    @torch.no_grad()
    def encode_query(self, images: Sequence[ImageInput], texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Composed query embeddings [B, D] (L2-normalised) for reference images + modification texts."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        out = []
        for s in range(0, len(images), batch_size):
            pooled, patches = self.image_features(images[s: s + batch_size])
            out.append(self.compose_features(pooled, patches, texts[s: s + batch_size]))
        return torch.cat(out) if out else torch.empty(0, self.backbone.embed_dim)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """Gallery image embeddings [N, D] (L2-normalised)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for s in range(0, len(images), batch_size):
            feats = self.backbone.encode_image(self._pixels(images[s: s + batch_size]), with_patches=False)
            out.append(F.normalize(feats.pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.backbone.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], adapted: bool = False) -> torch.Tensor:
        """Plain text embeddings (L2-normalised) of frozen CLIP, or of the adapted encoder with `adapted=True`."""
        return self.backbone.encode_text(list(texts), normalize=True, adapted=adapted)

    @torch.no_grad()
    def search(self, image: ImageInput, text: str, gallery, k: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, indices) of one query over a gallery embedding matrix [N, D] or an EmbeddingIndex."""
        q = self.encode_query([image], [text])
        if hasattr(gallery, "search") and not isinstance(gallery, torch.Tensor):
            return gallery.search(q, k)
        from .search.exact import exact_topk

        return exact_topk(q, torch.as_tensor(gallery), k)

    def __repr__(self) -> str:
        a = self.config.adapters
        return (f"Composer(stage={self.config.stage!r}, backbone={self.config.backbone.model_name!r}, "
                f"{self.phi!r}, adapters={None if a is None else f'{a.kind}x{a.num_layers} rank {a.rank}'}, "
                f"prompt={self.config.query_prompt!r})")

