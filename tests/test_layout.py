"""The package's layout as CONTRIBUTING.md states it, read from the source with `ast`: imports point
one way (from a layer to the layers below it), sit at the top of each file, and a long file says why
it is one file."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_llama"
SCRIPT_DIRS = ("scripts", "finetune", "generate", "pretrain", "quantize", "evaluate", "benchmarks")

# the order data flows: a module may import its own subpackage and the ranks below its own
RANKS = {"utils": 0, "cpu_kernels": 0, "templates": 1, "tokenizer": 2, "model": 3, "io": 4, "data": 5, "quant": 6, "peft": 7,
         "infer": 8, "eval": 9, "train": 9, "align": 10, "serve": 10, "api": 11, "__init__": 12, "__main__": 12}
# imports that stay inside a function, each for an optional dependency that the target imports at its top
INNER_ALLOWED = {
    ("lit_llama/__init__.py", "lit_llama.api"),  # the API pulls in Lightning: only when LLM is asked for
    ("lit_llama/quant/packed.py", "lit_llama.quant.kernels"),  # triton, CUDA only
    ("evaluate/harness.py", "lit_llama.eval.harness"),  # lm_eval, the optional `eval` extra
}
MAX_LINES = 450
REASON = "Why one file:"


def layer(module: str) -> str:
    """lit_llama.io.convert -> io; lit_llama -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def own_imports(tree: ast.AST):
    """(node, imported module) of every `lit_llama` import, with whether it sits inside a def or class."""
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] if node.module.split(".")[0] == "lit_llama" else []
            if node.module == "lit_llama":  # `from lit_llama import io` names a subpackage
                modules = [f"lit_llama.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names if a.name.split(".")[0] == "lit_llama"]
        for m in modules:
            yield node, m, id(node) in inner


def package_files():
    return sorted(PACKAGE.rglob("*.py"))


def layering_errors(path: Path, source: str):
    rel = path.relative_to(PACKAGE)
    here = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    errors = []
    for node, module, _ in own_imports(ast.parse(source)):
        there = layer(module)
        if there != here and RANKS[there] >= RANKS[here]:
            errors.append(f"lit_llama/{rel}:{node.lineno} ({here}) imports {module} ({there}), not a lower layer")
    return errors


def inner_import_errors(rel: str, source: str):
    return [f"{rel}:{node.lineno}: `{ast.unparse(node)}` inside a function; move it to the top"
            for node, module, inner in own_imports(ast.parse(source))
            if inner and (rel, module) not in INNER_ALLOWED]


def length_errors(rel: str, source: str):
    n = source.count("\n")
    doc = ast.get_docstring(ast.parse(source)) or ""
    return [f"{rel} has {n} lines and no '{REASON} ...' sentence in its docstring"] if n > MAX_LINES and REASON not in doc else []


def test_every_package_module_has_a_rank():
    layers = {p.relative_to(PACKAGE).parts[0] if p.parent != PACKAGE else p.stem for p in package_files()}
    assert layers - set(RANKS) == set(), "add the new module or subpackage to RANKS (and to CONTRIBUTING.md)"


def test_imports_point_down_the_layers():
    errors = [e for p in package_files() for e in layering_errors(p, p.read_text())]
    assert errors == []


def test_own_imports_at_the_top():
    files = package_files() + [p for d in SCRIPT_DIRS for p in sorted((ROOT / d).rglob("*.py"))] + sorted(ROOT.glob("*.py"))
    errors = [e for p in files for e in inner_import_errors(str(p.relative_to(ROOT)), p.read_text())]
    assert errors == []


def test_long_files_say_why():
    errors = [e for p in package_files() for e in length_errors(str(p.relative_to(ROOT)), p.read_text())]
    assert errors == []


@pytest.mark.parametrize("source, expected", [
    ("from lit_llama.infer.load import load_model\n", 1),  # io importing infer: upwards
    ("import lit_llama.serve.server\n", 1),
    ("from lit_llama import train\n", 1),
    ("from lit_llama.io.convert import HF_NAMES\nfrom lit_llama.model import Config\n", 0),  # own layer, lower
])
def test_layering_check_catches_upward_imports(source, expected):
    assert len(layering_errors(PACKAGE / "io" / "new.py", source)) == expected


def test_inner_import_and_length_checks_can_fail():
    source = '"""Doc."""\n\ndef f():\n    from lit_llama.model import Config\n    return Config\n'
    assert len(inner_import_errors("lit_llama/io/new.py", source)) == 1
    assert inner_import_errors("lit_llama/io/new.py", source.replace("    from lit_llama.model import Config\n", "")) == []
    long = '"""Doc."""\n' + "x = 1\n" * (MAX_LINES + 1)
    assert len(length_errors("lit_llama/io/new.py", long)) == 1
    assert length_errors("lit_llama/io/new.py", long.replace("Doc.", f"Doc.\n\n{REASON} one thing.")) == []
