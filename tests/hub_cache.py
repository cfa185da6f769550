"""Write repos into a local Hugging Face cache in the layout huggingface_hub resolves offline (tests only)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Mapping, Union

Content = Union[Path, bytes, str]


def put_in_hub_cache(cache: Path, repo_id: str, files: Mapping[str, Content], revision: str = "main",
                     repo_type: str = "model") -> str:
    """Store `files` as `repo_id` at `revision` in the hub cache folder `cache`; return the commit hash.

    The layout is what ``snapshot_download`` / ``hf_hub_download`` read: ``<type>s--<org>--<name>/refs/<revision>``
    holds the commit hash and ``snapshots/<commit>/`` the files.
    """
    commit = hashlib.sha1(f"{repo_type}:{repo_id}@{revision}".encode()).hexdigest()
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        elif isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)
    return commit


def offline_hf_home(home: Path, monkeypatch) -> Path:
    """Point huggingface_hub and datasets at an empty HF_HOME in offline mode; return its hub cache folder.

    Both libraries read HF_HOME / HF_HUB_OFFLINE once, at import: the running process is pointed at the same
    place as the environment (which subprocesses read).
    """
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return home / "hub"
