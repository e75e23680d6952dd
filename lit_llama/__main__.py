"""`python -m lit_llama COMMAND [FLAGS]` (or the `lit-llama` command): the repository's scripts by
name, so they run from any directory. Each command is the script itself, run as `python SCRIPT`
would run it:

    generate, chat, serve            generate.py, chat.py, serve.py
    generate NAME                    generate/NAME.py        (finetuned, lora, adapter, ...)
    finetune NAME, evaluate NAME     finetune/NAME.py, evaluate/NAME.py
    pretrain NAME, quantize NAME     pretrain/NAME.py, quantize/NAME.py
    SCRIPT                           scripts/SCRIPT.py       (download, convert_hf_checkpoint, ...)

The scripts live in the source tree beside the package (an editable install, `pip install -e .`,
as `make` does); `--help` after a command shows its flags.
"""

import runpy
import sys
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
TOP = ("generate", "chat", "serve")
FOLDERS = ("generate", "finetune", "evaluate", "pretrain", "quantize")


def commands() -> List[str]:
    """Every command, as the usage lists them."""
    found = [c for c in TOP if (ROOT / f"{c}.py").is_file()]
    for folder in FOLDERS:
        found += [f"{folder} {p.stem}" for p in sorted((ROOT / folder).glob("*.py"))]
    found += [p.stem for p in sorted((ROOT / "scripts").glob("*.py"))]
    return found


def resolve(argv: List[str]) -> Tuple[Optional[Path], List[str]]:
    """(the script a command names, the arguments left for it); None for an unknown command."""
    cmd, rest = argv[0], argv[1:]
    if cmd in FOLDERS and rest and not rest[0].startswith("-") and (ROOT / cmd / f"{rest[0]}.py").is_file():
        return ROOT / cmd / f"{rest[0]}.py", rest[1:]
    if cmd in TOP and (ROOT / f"{cmd}.py").is_file():
        return ROOT / f"{cmd}.py", rest
    if "/" not in cmd and (ROOT / "scripts" / f"{cmd}.py").is_file():
        return ROOT / "scripts" / f"{cmd}.py", rest
    return None, rest


def usage() -> str:
    return "usage: python -m lit_llama COMMAND [--help | FLAGS]\n\ncommands:\n" + \
        "".join(f"  {c}\n" for c in commands())


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return
    if not (ROOT / "generate.py").is_file():
        sys.exit(f"error: the lit_llama scripts are not beside this package ({ROOT}): install from the source tree "
                 f"with `pip install -e .`")
    script, rest = resolve(argv)
    if script is None:
        what = " ".join(argv[:2]) if argv[0] in FOLDERS else argv[0]
        sys.exit(f"error: unknown command {what!r}; `python -m lit_llama --help` lists them")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
