"""The Hugging Face Hub: model folders named by repo id, the model card, and the errors a person can act on.

A model is named by a local folder (``config.json`` + ``model.safetensors``) or a Hub repo id
(``user/repo``, optionally at a ``revision``). Repo ids are resolved by ``huggingface_hub``, so its cache
(``HF_HOME`` / ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``) and token (``HF_TOKEN`` or
``huggingface-cli login``) apply unchanged; an existing local folder always wins over a repo of the same name.

Every saved model folder gets a model card, ``README.md``: YAML metadata the Hub reads (library name,
base model, tags, data sets, ``model-index`` evaluation results) and a short description. What the card
records about training data and results is carried forward when a model is loaded and saved again.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["HUB_PREFIX", "LIBRARY_NAME", "MODEL_CARD", "CardInfo", "HubError", "base_model_of", "is_repo_id",
           "hub_file", "read_card_info", "resolve_model_folder", "validate_repo_id", "write_model_card"]

PathLike = Union[str, "os.PathLike[str]"]
MODEL_CARD = "README.md"
LIBRARY_NAME = "zscir"
HUB_PREFIX = "hf-hub:"  # open_clip's prefix for backbones stored on the Hub
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD)
TAGS = ("zscir", "composed-image-retrieval", "zero-shot", "clip", "open_clip")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CARD_KEY = "zscir"  # the card metadata zscir reads back (training data, results)
CardInfo = Dict[str, Any]  # {"stage", "training_data": {stage: text}, "datasets": [ids], "results": [...]}


class HubError(ValueError):
    """A Hub name that cannot be resolved or uploaded; the message names the problem and the fix."""


def is_repo_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repo id (``user/repo`` or ``repo``), not of a path."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def validate_repo_id(repo_id: str, what: str = "repo id") -> str:
    """`repo_id` if the Hub accepts it, else a :class:`HubError` saying what a repo id looks like."""
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise HubError(f"{what} {repo_id!r} is not a Hugging Face repo id; use 'user/name' (letters, digits, "
                       "'-', '_', '.')")
    return repo_id


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(name: str, revision: Optional[str], err: Exception, what: str, local: bool = True) -> HubError:
    """One line for a failed Hub lookup: what is missing and what to do about it (`local`: a folder was tried)."""
    from huggingface_hub import errors

    at = f" at revision {revision!r}" if revision else ""
    nofolder = "no such local folder, and " if local else ""
    if isinstance(err, errors.RevisionNotFoundError):
        return HubError(f"{what} {name!r}: the Hub repo has no revision {revision!r}; give a branch, tag or "
                        "commit that exists")
    if isinstance(err, errors.GatedRepoError):
        return HubError(f"{what} {name!r}: the Hub repo is gated; accept its terms on huggingface.co and log in "
                        "(huggingface-cli login, or HF_TOKEN)")
    if isinstance(err, errors.RepositoryNotFoundError):
        return HubError(f"{what} {name!r}: {nofolder}no Hub repo {name!r} (or it is private: log in with "
                        "huggingface-cli login or set HF_TOKEN)")
    if isinstance(err, errors.EntryNotFoundError) and not isinstance(err, errors.LocalEntryNotFoundError):
        return HubError(f"{what} {name!r}{at}: the Hub repo lacks a file zscir needs ({err})")
    if _offline():
        return HubError(f"{what} {name!r}{at}: {nofolder}the Hub repo is not in the Hugging Face cache while "
                        "HF_HUB_OFFLINE=1 forbids downloading it; download it once online "
                        f"(huggingface-cli download {name}), or unset HF_HUB_OFFLINE")
    return HubError(f"{what} {name!r}{at}: {nofolder}the Hub could not be reached and the repo is not in the "
                    "Hugging Face cache; check the connection, or download it once "
                    f"(huggingface-cli download {name})")


def resolve_model_folder(name: PathLike, revision: Optional[str] = None, token: Optional[str] = None,
                         cache_dir: Optional[PathLike] = None, what: str = "model") -> Path:
    """The folder of a model named by a local path or a Hub repo id (downloaded into the HF cache, or found there).

    A Hub download fetches only ``config.json``, ``model.safetensors`` and ``README.md``.
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision:
            raise HubError(f"{what} {text}: a revision only applies to Hub repo ids, and this is a local folder")
        return path
    if path.exists():
        raise FileNotFoundError(f"{what} {text}: a file, not a model folder (config.json + model.safetensors)")
    if not is_repo_id(text) or "/" not in text:  # a bare word is more likely a mistyped folder than a repo
        raise FileNotFoundError(f"{what} {text}: not a model folder (no such folder; a Hub repo id reads user/name)")
    from huggingface_hub import errors, snapshot_download

    from . import __version__

    try:
        folder = snapshot_download(text, revision=revision, token=token, cache_dir=cache_dir,
                                   allow_patterns=list(MODEL_FILES), library_name=LIBRARY_NAME,
                                   library_version=__version__)
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
            errors.HFValidationError, OSError) as err:
        raise _hub_error(text, revision, err, what) from None
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise HubError(f"{what} {text!r}: the Hub repo has no {CONFIG_NAME}; it is not a zscir model "
                       "(written by Composer.save_pretrained / push_to_hub)")
    return folder


def hub_file(repo_id: str, filename: str, what: str = "backbone") -> Path:
    """One file of a Hub repo through the HF cache (offline: the cached copy), with a one-line error."""
    from huggingface_hub import errors, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
            errors.HFValidationError, OSError) as err:
        raise _hub_error(repo_id, None, err, what, local=False) from None


# ------------------------------------------------------------------------------------------ model card
def base_model_of(backbone: Mapping[str, Any]) -> Optional[str]:
    """The Hub repo the backbone's weights come from (``hf-hub:`` names, open_clip tags hosted on the Hub), if any."""
    name, tag = str(backbone.get("model_name") or ""), backbone.get("pretrained")
    if name.startswith(HUB_PREFIX):
        return name[len(HUB_PREFIX):]
    if not tag or os.sep in str(tag) or Path(str(tag)).exists():
        return None
    try:
        import open_clip

        hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub") or ""
    except Exception:  # an architecture open_clip does not know: no base model to name
        return None
    return hub.strip("/") or None


def read_card_info(folder: PathLike) -> CardInfo:
    """What an existing model card records for zscir (training data, results); empty without a card."""
    path = Path(folder) / MODEL_CARD
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        return {}
    try:
        import yaml

        meta = yaml.safe_load(match.group(1)) or {}
    except Exception as err:  # a hand-edited card with broken YAML: it is documentation, not the model
        logger.warning("%s: unreadable model card metadata (%s); it is rewritten on the next save", path, err)
        return {}
    info = meta.get(_CARD_KEY) if isinstance(meta, dict) else None
    return dict(info) if isinstance(info, dict) else {}


def _check_results(results: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Evaluation results as zscir eval writes them ({"dataset", "split", "metrics"}); a clear error otherwise."""
    out = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping) or not isinstance(r.get("metrics"), Mapping) or not r.get("dataset"):
            raise ValueError(f"results[{i}]: expected a dict with 'dataset', 'split' and 'metrics' (what zscir "
                             "eval writes to results.json)")
        metrics = {str(k): float(v) for k, v in r["metrics"].items() if isinstance(v, (int, float))}
        out.append({"dataset": str(r["dataset"]), "split": str(r.get("split") or "test"), "metrics": metrics})
    return out


def _merge_results(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Results by (dataset, split): a newer evaluation of the same split replaces the older one."""
    merged: Dict[tuple, Dict[str, Any]] = {}
    for r in list(old) + list(new):
        merged[(r["dataset"], r["split"])] = dict(r)
    return list(merged.values())


def _backbone_text(backbone: Mapping[str, Any], embedded: bool) -> str:
    name, tag = backbone.get("model_name"), backbone.get("pretrained")
    if str(name).startswith(HUB_PREFIX):
        return f"open_clip `{name}` (weights from the Hub)"
    if embedded:
        return f"open_clip architecture `{name}`, weights stored in this folder"
    return f"open_clip `{name}` with pretrained weights `{tag}`"


def _metric_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "metric"


def write_model_card(folder: PathLike, config: Mapping[str, Any], training_data: Optional[Mapping[str, str]] = None,
                     results: Optional[Sequence[Mapping[str, Any]]] = None, datasets: Sequence[str] = (),
                     name: Optional[str] = None) -> Path:
    """Write (or update) ``README.md`` of a model folder: Hub metadata + description; earlier entries are kept.

    `config` is the folder's ``config.json`` content; `training_data` maps a stage ("stage1", "stage2", ...) to
    a one-line summary of its data; `results` are evaluation results as ``zscir eval`` writes them;
    `datasets` are Hub data set ids the model was trained on.
    """
    from huggingface_hub import EvalResult, ModelCardData

    folder = Path(folder)
    info = read_card_info(folder)
    data = dict(info.get("training_data") or {})
    data.update({str(k): str(v) for k, v in (training_data or {}).items()})
    hub_datasets = sorted(set(info.get("datasets") or []) | set(datasets))
    merged = _merge_results(_check_results(info.get("results") or []), _check_results(results or []))
    backbone = dict(config.get("backbone") or {})
    stage = str(config.get("stage", "untrained"))
    name = name or folder.resolve().name
    evals = [EvalResult(task_type="composed-image-retrieval", task_name="Composed image retrieval",
                        dataset_type=r["dataset"], dataset_name=r["dataset"], dataset_split=r["split"],
                        metric_type=_metric_slug(k), metric_name=k, metric_value=round(v, 2))
             for r in merged for k, v in r["metrics"].items()]
    card_data = ModelCardData(library_name=LIBRARY_NAME, tags=list(TAGS), base_model=base_model_of(backbone),
                              datasets=hub_datasets or None, model_name=name, eval_results=evals or None,
                              **{_CARD_KEY: {"stage": stage, "training_data": data, "datasets": hub_datasets,
                                             "results": merged}})
    phi, adapters = config.get("phi") or {}, config.get("adapters")
    adapter_text = "none" if not adapters else \
        f"{adapters.get('kind')} in the last {adapters.get('num_layers')} text blocks (rank {adapters.get('rank')})"
    lines = [
        "---", card_data.to_yaml().strip(), "---", "",
        f"# {name}", "",
        "A zero-shot composed image retrieval model trained with zscir (TSCIR, \"From Mapping to Composing\"): "
        "a reference image and a modification text give one query embedding, searched against CLIP image "
        "embeddings.", "",
        "| part | |", "|---|---|",
        f"| stage | {stage} |",
        f"| backbone | {_backbone_text(backbone, bool(config.get('embed_backbone')))} |",
        f"| phi | {phi.get('num_tokens', '?')} pseudo tokens, VSI {'on' if phi.get('use_vsi') else 'off'} |",
        f"| adapters | {adapter_text} |",
        f"| query prompt | `{config.get('query_prompt', '')}` |", "",
        "## Training data", "",
    ]
    lines += [f"* {k}: {v}" for k, v in sorted(data.items())] or ["Not recorded."]
    lines += ["", "## Evaluation", ""]
    if merged:
        for r in merged:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items())
            lines.append(f"* {r['dataset']} {r['split']}: {shown}")
    else:
        lines.append("Not evaluated yet (`zscir eval --model FOLDER`; pass its results to save_pretrained).")
    lines += ["", "## Use", "", "```python", "from zscir import Composer", "",
              "composer = Composer.from_pretrained(\"REPO_OR_FOLDER\")",
              "query = composer.encode_query([\"ref.jpg\"], [\"make it red\"])   # [1, D], L2-normalised",
              "gallery = composer.encode_images([\"a.jpg\", \"b.jpg\"])", "```", ""]
    path = folder / MODEL_CARD
    atomic_write_text(path, "\n".join(lines))
    return path
