"""Calls into native libraries that can crash the interpreter, made in a fresh Python process.

llama.cpp's kernels differ by CPU, and one build of them segfaults on some CPUs (the AMX kernels on
Q8_0 / Q4_x matrices). In the pytest process such a crash ends the whole suite with no result; in a
subprocess it fails the one test that made the call, with the signal named, and the suite goes on.
The functions run here take and return plain data (paths, lists, numpy arrays)."""

import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


class SubprocessCrashed(AssertionError):
    """The subprocess died without an answer: a native crash, a kill, or a timeout."""


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def run_isolated(fn: Callable, *args, timeout: float = 600, **kwargs):
    """fn(*args, **kwargs) in a new Python process (this file run as a script, with this process's
    sys.path); its return value, or AssertionError naming how the process died (with the end of its
    stderr) or what it raised. `fn` must be a module-level function of an importable module."""
    name = getattr(fn, "__qualname__", repr(fn))
    with tempfile.TemporaryDirectory() as tmp:
        call, answer = Path(tmp, "call.pkl"), Path(tmp, "answer.pkl")
        with call.open("wb") as f:
            pickle.dump(sys.path, f)  # first, so that the child can import `fn`'s module
            pickle.dump((fn, args, kwargs), f)
        try:
            r = subprocess.run([sys.executable, __file__, str(call), str(answer)], capture_output=True,
                               text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SubprocessCrashed(f"{name} did not finish within {timeout:.0f} s in its subprocess") from None
        if not answer.exists():
            tail = "\n".join(r.stderr.strip().splitlines()[-5:])
            raise SubprocessCrashed(f"{name} crashed its subprocess ({_death(r.returncode)}) before answering"
                                    + (f"; its stderr ends:\n{tail}" if tail else ""))
        ok, value = pickle.loads(answer.read_bytes())
    if not ok:
        raise AssertionError(f"{name} raised in its subprocess:\n{value}")
    return value


def _serve(call: str, answer: str) -> None:
    with open(call, "rb") as f:
        sys.path[:0] = pickle.load(f)
        fn, args, kwargs = pickle.load(f)
    try:
        result = (True, fn(*args, **kwargs))
    except BaseException as e:  # sent back whole: the parent raises it with the child's traceback
        result = (False, "".join(traceback.format_exception(e)))
    tmp = Path(answer + ".tmp")
    tmp.write_bytes(pickle.dumps(result))
    tmp.rename(answer)  # whole or absent: a crash while writing reads as a crash


# ---------------------------------------------------------------- llama.cpp (llama-cpp-python)


def llama_cpp_run(path: Path, ids: Sequence[int] = (), n_ctx: int = 64, tokenize: Sequence[tuple] = ()) -> dict:
    """Load a GGUF file in llama.cpp; its logits for `ids` (a teacher-forced pass, (len(ids), vocab)),
    the tokens of each (text, add_bos, special) in `tokenize`, and its chat template."""
    from llama_cpp import Llama

    # float32 KV cache (llama.cpp defaults to float16), so that only the weights' format and the
    # summation order differ from our fp32 model
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    out = {"tokens": [llm.tokenize(text.encode(), add_bos=add_bos, special=special) for text, add_bos, special in tokenize],
           "chat_template": llm.metadata.get("tokenizer.chat_template")}
    if ids:
        llm.reset()
        llm.eval(list(ids))
        out["logits"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def segfault() -> None:
    """Dereference address 0, as a broken native kernel would (for the test of run_isolated)."""
    import ctypes

    ctypes.string_at(0)


if __name__ == "__main__":
    _serve(*sys.argv[1:3])
