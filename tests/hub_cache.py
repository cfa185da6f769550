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
