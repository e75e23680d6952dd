"""Small shared helpers: the user-facing error type, the CLI runner, atomic output directories."""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


def run_cli(main: Callable, **kwargs) -> None:
    """Run `main` through jsonargparse; a UserError becomes one line on stderr and exit code 1."""
    from jsonargparse import CLI

    try:
        CLI(main, as_positional=False, **kwargs)
    except (UserError, OSError) as e:
        # OSError: files the user named that cannot be read or written (missing, permissions, a file
        # where a folder should be): their message names the path
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir` that becomes `out_dir` only when the block
    succeeds; on any error it is removed, so no half-written output is ever left behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _make_readable(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _make_readable(tmp: Path) -> None:
    # mkdtemp and some writers create private (0700/0600) entries; give the usual umask modes
    umask = _umask()
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


PRECISIONS = ("32-true", "bf16-true", "16-true", "64-true", "bf16-mixed", "16-mixed", "32", "16", "bf16", "64")


def default_precision() -> str:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (which has no fast half math)."""
    import torch

    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def make_fabric(precision: str = None, devices=1, **kwargs):
    """A Lightning Fabric with `precision` checked first, so a typo is one clear line."""
    import lightning as L

    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS[:6])}")
    return L.Fabric(devices=devices, precision=precision, **kwargs)
