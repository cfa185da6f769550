"""Output folders of runs: what a command wrote there, with which settings, and never deleting anything else.

A command that writes a folder (``train-stage1``, ``train-stage2``, ``train-bank``,
``demo``) records a run file in it (``run.json``; the demo's is ``demo_run.json``):
the command, the settings that make the run what it is (configuration, data and
model fingerprints), its status and the names of the entries it writes. Then

* a new or empty folder starts a run (asked to resume, it says there is nothing to resume);
* a folder holding a run is refused unless the run continues (``--resume``; the
  recorded settings must match, and every differing field is named) or is
  replaced (``--overwrite``);
* replacing removes only the entries the run file lists, and refuses a folder
  that holds anything zscir did not write (named in the error), so
  ``--out . --overwrite`` can never empty a working directory;
* a folder with foreign files and no run is refused as well (choose another folder).

Folders written before run files existed are recognised by their entries
(e.g. ``state/`` and ``model/``): they can be continued (their settings are not
checked, which is said) or replaced.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .checkpoint import atomic_write_json, file_sha256, read_json_object

logger = logging.getLogger(__name__)

__all__ = ["RUN_FILE", "RunFolder", "RunFolderError", "RunMismatchError", "data_fingerprint", "folder_fingerprint"]

RUN_FILE = "run.json"
_SHOWN = 8  # foreign entries named in an error
_TEMP = re.compile(r"\.(?P<name>.+)\.[^.]+\.tmp")  # what zscir.checkpoint's atomic writes leave after a kill


class RunFolderError(FileExistsError):
    """An output folder cannot be used as asked (another run, or files zscir did not write)."""


class RunMismatchError(ValueError):
    """A run was asked to continue with settings other than those it was started with."""


#: Files of a model folder that describe it but do not change what it computes (left out of its fingerprint).
DOCUMENTATION_FILES = ("README.md",)


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and contents of the (non-hidden) files in a folder, e.g. a model folder.

    The model card (README.md) is documentation: rewriting it does not make another model.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    h = hashlib.sha256(b"folder\n")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.relative_to(folder).as_posix() not in DOCUMENTATION_FILES):
        h.update(f"{path.relative_to(folder).as_posix()}\n{file_sha256(path)}\n".encode())
    return h.hexdigest()


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as one dict with dotted keys (lists and other values stay whole)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: Dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any, limit: int = 48) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class RunFolder:
    """One command's output folder: what it writes (`outputs`, replaced by overwrite; `kept`: caches that stay)."""

    path: Path
    command: str
    settings: Dict[str, Any]  # compared when the run continues
    outputs: Sequence[str]  # top-level entries the command writes (besides the run file)
    kept: Sequence[str] = ()  # entries it writes that replacing the run keeps (keyed caches)
    free: Sequence[str] = ()  # dotted settings that may change when the run continues (e.g. config.train.steps)
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)  # for people reading the run file; not compared
    run_file: str = RUN_FILE

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # ------------------------------------------------------------------ reading
    def _recorded(self) -> Optional[Dict[str, Any]]:
        """The run file's content in its current form, or None when there is none."""
        path = self.path / self.run_file
        if not path.is_file():
            return None
        data = read_json_object(path, RunFolderError, "run file", "remove it or choose another --out")
        if "settings" not in data:  # a demo run file written before run files had this form: the settings alone
            data = {"command": self.command, "settings": data}
        return data

    def _ours(self, recorded: Optional[Dict[str, Any]]) -> List[str]:
        """Entry names this folder's run wrote (the run file's list, else this command's)."""
        listed = recorded.get("outputs") if recorded else None
        names = [n for n in (listed if isinstance(listed, list) else self.outputs)
                 if isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")]
        return [self.run_file, *names]

    def _foreign(self, ours: Sequence[str]) -> List[str]:
        """Entries of the folder that no zscir run wrote (sorted)."""
        known = set(ours) | set(self.kept)
        out = []
        for entry in self.path.iterdir():
            temp = _TEMP.fullmatch(entry.name)
            if entry.name in known or (temp and temp.group("name") in known):
                continue
            out.append(entry.name)
        return sorted(out)

    def _refuse_foreign(self, foreign: Sequence[str], why: str) -> None:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        raise RunFolderError(f"{self.path} holds files zscir did not write ({shown}); {why}. zscir never deletes "
                             "files it did not write, --overwrite included: choose another --out, or move them away")

    # ------------------------------------------------------------------ opening
    def open(self, resume: Optional[bool], overwrite: bool) -> bool:
        """Prepare the folder and record this run; return whether an earlier run continues.

        `resume`: True continues the run in the folder (settings checked), False starts one, None continues it
        when its settings are the same (the demo's reuse of finished parts).
        """
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            if resume:
                logger.warning("%s: nothing to resume in %s; starting a new run", self.command, self.path)
            self._write("started")
            return False
        if not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file, not a folder")
        recorded = self._recorded()
        ours = self._ours(recorded)
        legacy = recorded is None and any((self.path / n).exists() for n in self.outputs)
        if recorded is None and not legacy:
            foreign = self._foreign(ours)
            if foreign:
                self._refuse_foreign(foreign, "it is not the folder of a zscir run")
            if resume:  # only keyed caches of an earlier run: a new run uses them
                logger.warning("%s: nothing to resume in %s; starting a new run", self.command, self.path)
            self._write("started")
            return False
        what = (f"a {recorded.get('status', 'started')} run of zscir {recorded.get('command')}" if recorded
                else f"a run of an older zscir (no {self.run_file})")
        if recorded is not None and recorded.get("command") != self.command:
            if not overwrite:
                raise RunFolderError(f"{self.path} holds {what}, not of zscir {self.command}; pass --overwrite to "
                                     "replace it, or choose another --out")
            return self._replace(ours)
        same = recorded is not None and not self.differences(recorded.get("settings"), strict=True)
        if resume is None and same:
            self._write("started")
            return True
        if resume:
            if legacy:
                logger.warning("%s: %s has no %s (written by an older zscir): its settings cannot be checked "
                               "against this run's", self.command, self.path, self.run_file)
            else:
                differ = self.differences(recorded.get("settings"))
                if differ:
                    raise RunMismatchError(
                        f"cannot resume {self.path}: its run was started with other settings: {'; '.join(differ)}. "
                        "Pass the run's settings, --overwrite to replace the run, or choose another --out")
            self._write("started")
            return True
        if overwrite:
            return self._replace(ours)
        how = "pass --resume to continue it or --overwrite to replace it" if resume is not None \
            else "pass --overwrite to replace it"
        raise RunFolderError(f"{self.path} holds {what}; {how}, or choose another --out")

    def differences(self, recorded: Any, strict: bool = False) -> List[str]:
        """Settings that differ from `recorded`, as "field (run: X, now: Y)"; `free` fields count only if `strict`."""
        before, now = _flatten(recorded if isinstance(recorded, dict) else {}), _flatten(self.settings)
        free = set() if strict else set(self.free)
        return [f"{key} (run: {_short(before.get(key))}, now: {_short(now.get(key))})"
                for key in sorted(set(before) | set(now)) if key not in free and before.get(key) != now.get(key)]

    def _replace(self, ours: Sequence[str]) -> bool:
        """Remove the entries the earlier run lists (refused next to foreign files) and record this run."""
        foreign = self._foreign(ours)
        if foreign:  # the folder may be the wrong one (--out .): replace nothing
            self._refuse_foreign(foreign, "it is not only the folder of a zscir run")
        for name in ours:
            for entry in [self.path / name, *self.path.glob(f".{glob.escape(name)}.*.tmp")]:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.exists() or entry.is_symlink():
                    entry.unlink()
        logger.info("%s: replaced the earlier run in %s", self.command, self.path)
        self._write("started")
        return False

    def _write(self, status: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / self.run_file, {
            "command": self.command, "status": status, "settings": self.settings,
            "outputs": list(self.outputs), "kept": list(self.kept), "info": self.info,
        })

    def finish(self) -> None:
        """Mark the run finished (its outputs are complete)."""
        self._write("finished")

    def __truediv__(self, name: str) -> Path:
        """A path inside the folder."""
        return self.path / name


def data_fingerprint(items: Sequence[str]) -> str:
    """SHA-256 over a list of strings (image paths, triplet rows): the data entry of a run's settings."""
    h = hashlib.sha256(b"items\n")
    for item in items:
        h.update(item.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()
