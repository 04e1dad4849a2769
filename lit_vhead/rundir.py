"""A run owns its directory: an exclusive lock for as long as it runs, no fresh start over an earlier run's outputs,
and output paths checked before any work.

Run dirs are named to the microsecond (``configs/hydra/default.yaml``), so runs started in the same second get their
own; two runs given the same ``hydra.run.dir`` meet the lock, and the second stops with one line before it writes
anything (``RunDirGuard`` stops it before Hydra rewrites the first run's ``.hydra/``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; run dirs stay unique by name
    fcntl = None

LOCK_NAME = ".lock"
# What a run leaves in its dir (relative paths), besides Hydra's .hydra/ and the lock.
RUN_OUTPUTS = ("policy", "csv/metrics.csv", "curves.png", "checkpoints", "wandb", "tensorboard", "metrics.json")


class RunDirBusyError(FileExistsError):
    """Another live run holds this run dir."""


def _child_rank() -> bool:
    """A process that Lightning or torchrun started for another rank of the same run (rank 0 owns the dir)."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "RANK", "NODE_RANK"))


def _busy_error(run_dir: Path) -> RunDirBusyError:
    return RunDirBusyError(
        f"{run_dir} is in use by another run (it holds {run_dir / LOCK_NAME}); give this run its own "
        "hydra.run.dir, or leave hydra.run.dir unset for a new one."
    )


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def own_run_dir(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` while the block runs (released by the kernel even on SIGKILL); raise
    ``RunDirBusyError`` when another run holds it. Other ranks of the same run share their rank 0's dir."""
    if fcntl is None or _child_rank():
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(run_dir / LOCK_NAME)
    if fd is None:
        raise _busy_error(run_dir)
    try:
        yield
    finally:
        os.close(fd)


def is_busy(run_dir: str | os.PathLike) -> bool:
    """Whether another live process holds ``run_dir``'s lock (nothing is created when it has none)."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return False
    fd = _try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


class RunDirGuard(Callback):
    """Hydra callback (``configs/hydra/default.yaml``), before Hydra writes ``.hydra/`` into the run dir:
    - a run dir in use by another run stops this one with one line, leaving the other's ``.hydra/`` as it is;
    - a resume (``ckpt_path`` set) keeps the run's ``.hydra/`` (``train`` writes the resumed config there once the
      resume really starts, and nothing when there is nothing to do)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _child_rank():
            return
        run_dir = Path(str(config.hydra.run.dir))
        if is_busy(run_dir):
            print(f"Error: {_busy_error(run_dir)}", flush=True)
            sys.exit(1)
        if config.get("ckpt_path") is not None:
            with read_write(config.hydra):
                config.hydra.output_subdir = None


def earlier_outputs(run_dir: str | os.PathLike) -> list[str]:
    """The outputs of an earlier run found in ``run_dir`` (checkpoints only when some ``.ckpt`` is there)."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if (any(path.glob("*.ckpt")) if name == "checkpoints" else path.exists()):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def check_fresh_start(run_dir: str | os.PathLike) -> None:
    """A run from scratch must not mix its outputs with an earlier run's (appended metrics, a second wandb run,
    overwritten checkpoints): refuse, naming what is there and the way out. Nothing is touched."""
    found = earlier_outputs(run_dir)
    if not found:
        return
    resume = "resume it with ckpt_path=last, or " if "checkpoints/" in found else ""
    raise FileExistsError(
        f"{run_dir} already holds an earlier run ({', '.join(found)}): {resume}pick a new hydra.run.dir. "
        "Nothing was overwritten."
    )


def check_writable_dir(path: str | os.PathLike, key: str) -> None:
    """Fail now, not after the last PPO step, when ``path`` cannot become a directory we write into: it is a file,
    or the nearest existing directory on its way does not take new files (permissions, a read-only mount)."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{key}={path} is a file, not a directory: pick a directory path (or null).")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{key}={path} lies under the file {existing}: pick a directory path (or null).")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PermissionError(
            f"{key}={path} cannot be written ({existing} does not take new files: {err.strerror}); pick a writable "
            "directory (or null)."
        ) from None


def remove_if_empty(run_dir: str | os.PathLike) -> None:
    """A run that failed before writing anything leaves no run dir (Hydra made it, its .hydra/ and its parents under
    the working directory, e.g. outputs/ppo/runs/, at start)."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir() or any(p.name not in (".hydra", "train.log", LOCK_NAME) for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().absolute()
    for parent in run_dir.parents:
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()
