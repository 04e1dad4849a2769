"""Writes that lose nothing: new content goes to a temporary name in the target's own directory, is flushed to disk
(fsync), then renamed over the target, so a crash, a kill or a full disk leaves the old file or the new one, never a
torn one, whatever filesystem the system's temp dir is on.

``atomic_file`` writes one file (Lightning checkpoints, through ``lit_vhead.checkpoint_io.AtomicCheckpointIO``).
``atomic_directory`` writes a model directory (``save_pretrained``, ``PPOTrainer.save_state``) that may also hold the
user's own files: only the files the save writes, and the weight files a previous save wrote, are replaced or
removed; everything else stays where it is, untouched (never copied, symlinks included).

A killed save leaves its temporary file or directory (``.<name>.lit-tmp.<pid>@<host>.*``) behind; the next save into
the same directory removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lit_vhead.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_MODEL_DIR,
    PICKLE_INDEX,
    PICKLE_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    weight_files,
)

_TEMP_MARK = ".lit-tmp."
_LEFTOVER = re.compile(r"^\..*\.lit-tmp\.(\d+)@([\w-]*)\.")
# The files that select the weights a loader reads, most preferred first: a save renames them into place last (the
# new weights take effect in one rename) and a previous save's are removed in this order.
_ENTRY_FILES = (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX, *ADAPTER_WEIGHTS, ADAPTER_CONFIG)


def _host() -> str:
    return re.sub(r"[^\w-]", "_", socket.gethostname())


def _temp_prefix(name: str) -> str:
    return f".{name}{_TEMP_MARK}{os.getpid()}@{_host()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftovers(directory: str | os.PathLike) -> None:
    """Remove the temporary files and directories that killed saves of this host left in ``directory``."""
    host = _host()
    for entry in os.scandir(directory):
        match = _LEFTOVER.match(entry.name)
        if match and match[2] == host and not _alive(int(match[1])):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(root: Path) -> None:
    """Give what a save wrote under ``root`` the modes of ordinary new files (0755 dirs, 0644 files under umask 022;
    ``mkdtemp``/``mkstemp``, ours and libraries', make them private) and flush it all to disk."""
    umask = _current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            os.chmod(path, 0o666 & ~umask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file to write the new content of ``path`` into; on success it replaces ``path`` in one rename
    (a symlink is followed: the file it points to is replaced). If the body raises, ``path`` is untouched and the
    temporary file is removed."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent)
    fd, temp = tempfile.mkstemp(prefix=_temp_prefix(target.name), dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o666 & ~_current_umask())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(target.parent)


def previous_save_files(directory: str | os.PathLike) -> list[str]:
    """The files a previous save left in ``directory``: its weight files (entry files first, then shards) and
    adapter config, and ``base_model/`` when its adapters load their base from there. Nothing else counts."""
    directory = Path(directory)
    names = weight_files(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        names.append(ADAPTER_CONFIG)
        if (directory / BASE_MODEL_DIR).is_dir() and _records_base_in(directory, directory):
            names.append(BASE_MODEL_DIR)
    return names


def _records_base_in(adapters: Path, directory: Path) -> bool:
    """Whether the adapters saved in ``adapters`` load their base from ``directory/base_model``."""
    try:
        recorded = json.loads((adapters / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(recorded, str) and os.path.realpath(recorded) == os.path.realpath(directory / BASE_MODEL_DIR)


def _commit_order(name: str) -> int:
    """Other files first, then the entry files, least preferred first: the loaders switch to the new weights last."""
    return len(_ENTRY_FILES) - _ENTRY_FILES.index(name) if name in _ENTRY_FILES else 0


def _check_replaceable(staging: Path, target: Path, names: list[str]) -> None:
    """A file never replaces a directory, nor a directory a file (symlinks aside): that would drop the user's."""
    for name in names:
        old = target / name
        if old.exists() and not old.is_symlink() and old.is_dir() != (staging / name).is_dir():
            kinds = ("a directory", "a file") if old.is_dir() else ("a file", "a directory")
            raise FileExistsError(
                f"Cannot save into '{target}': '{name}' there is {kinds[0]}, and the save writes {kinds[1]} of that "
                "name. Move it away, or save into another directory."
            )


def _commit(staging: Path, target: Path) -> None:
    """Rename everything in ``staging`` into ``target`` (a replaced directory or symlink is moved into ``staging``,
    which the caller removes), then remove a previous save's weight files that this save did not write."""
    new = sorted(os.listdir(staging), key=_commit_order)
    keep = set(new) | ({BASE_MODEL_DIR} if _records_base_in(staging, target) else set())
    stale = [name for name in previous_save_files(target) if name not in keep]
    _check_replaceable(staging, target, new)
    for name in new:
        source, destination = staging / name, target / name
        if source.is_dir() and (destination.is_dir() or destination.is_symlink()):
            os.replace(destination, staging / f".replaced-{name}")  # a directory cannot be renamed over another
        os.replace(source, destination)
    _fsync_dir(target)
    for name in stale:
        old = target / name
        if old.is_dir() and not old.is_symlink():
            os.replace(old, staging / f".stale-{name}")
        else:
            old.unlink()
    _fsync_dir(target)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory to write a save into; on success its files replace their namesakes in ``target``.

    ``target`` need not exist; a symlink to a directory stays a symlink (the save goes into the directory it points
    to). Each file is written to disk before it is renamed into place, and the entry files that decide which weights
    load (``model.safetensors``, the shard indexes, ``adapter_*``) come last, so the new weights take effect in one
    rename; the weight files of a previous save that this one does not write (its shards, a PEFT save's adapters
    and ``base_model/``) are removed afterwards. Everything else in ``target`` stays untouched. If the body raises,
    ``target`` is left exactly as it was (and removed again if this call created it).
    """
    real = Path(os.path.realpath(target))
    created = not real.exists()
    real.mkdir(parents=True, exist_ok=True)
    remove_leftovers(real)
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix("save"), dir=real))
    try:
        yield str(staging)
        _settle(staging)
        _commit(staging, real)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                real.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
