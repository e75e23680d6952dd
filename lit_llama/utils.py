"""Small shared helpers: the user-facing error type, the CLI runner, atomic output directories."""

import contextlib
import dataclasses
import inspect
import os
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


def run_cli(main: Callable, args: Optional[Sequence[str]] = None) -> None:
    """Run `main` with flags from the command line (its docstring's `Args:` become `--help`); a
    UserError becomes one line on stderr and exit code 1.

    A parameter typed with a dataclass (TrainArgs, SamplingArgs) contributes its fields as flags of
    their own (`--max_iters`, not `--train.max_iters`), with the help text of the dataclass's
    docstring: the flags are declared once, in the dataclass, and every script that takes the
    group gets them; the signature's default instance gives that script's defaults."""
    from jsonargparse import CLI

    try:
        groups = _dataclass_params(main)
        if not groups:
            CLI(main, as_positional=False, args=args)
            return
        parser = _grouped_parser(main, groups)
        ns = parser.parse_args(args)
        values = vars(ns) if not hasattr(ns, "as_dict") else ns.as_dict()
        values.pop("config", None)
        kwargs = {k: v for k, v in values.items() if k not in _group_fields(groups)}
        for name, (cls, default) in groups.items():
            fields = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
            kwargs[name] = dataclasses.replace(default, **fields) if default is not None else cls(**fields)
        main(**kwargs)
    except (UserError, OSError) as e:
        # OSError: files the user named that cannot be read or written (missing, permissions, a file
        # where a folder should be): their message names the path
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _dataclass_params(main: Callable) -> Dict[str, Tuple[type, object]]:
    hints = typing.get_type_hints(main)
    out = {}
    for name, param in inspect.signature(main).parameters.items():
        cls = hints.get(name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            default = None if param.default is inspect.Parameter.empty else param.default
            out[name] = (cls, default)
    return out


def _group_fields(groups) -> set:
    return {f.name for cls, _ in groups.values() for f in dataclasses.fields(cls)}


def _grouped_parser(main: Callable, groups):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=(inspect.getdoc(main) or "").split("\n\n")[0] or None)
    parser.add_function_arguments(main, skip=set(groups), as_positional=False, as_group=False)
    for cls, default in groups.values():
        parser.add_class_arguments(cls, nested_key=None)
        if default is not None:
            parser.set_defaults({f.name: getattr(default, f.name) for f in dataclasses.fields(cls)})
    return parser


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


def check_disk(output_dir: Path, needed: int) -> None:
    """UserError, before anything is written, where the disk that will hold `output_dir` has less
    free space than `needed` bytes."""
    parent = Path(output_dir).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise UserError(f"{output_dir} needs {needed / 1e9:.2f} GB of disk, {parent} has {free / 1e9:.2f} GB free")


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


def format_duration(seconds: float) -> str:
    """A duration for progress lines: 00:01:05, 1d 01:01:01."""
    days, rest = divmod(int(seconds), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {clock}" if days else clock
