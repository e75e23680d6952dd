"""Bad input to the conversion and download scripts: one `error:` line, no traceback, no output.

The main cases run each script as a subprocess with this interpreter, as a user would; most of
such a run is importing torch, so they all start together once and each test checks one. The
other cases call the script's `main` through the same `run_cli` in this process."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "scripts" / "convert_hf_checkpoint.py"
META = ROOT / "scripts" / "convert_checkpoint.py"
DOWNLOAD = ROOT / "scripts" / "download.py"

HF_CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": True}
META_PARAMS = {"dim": 16, "n_layers": 1, "n_heads": 2, "multiple_of": 16, "norm_eps": 1e-5, "vocab_size": 32}

# Every scenario runs in its own directory `d` (also the working directory): it must leave no
# d/out (the output dir given), no d/checkpoints (download's default) and no d/pwned (see Evil).
SCENARIOS, IN_SUBPROCESS = {}, set()


def scenario(fn=None, *, subprocess=False):
    def register(fn):
        SCENARIOS[fn.__name__] = fn
        if subprocess:
            IN_SUBPROCESS.add(fn.__name__)
        return fn

    return register(fn) if fn else register


class Evil:
    """Unpickling this runs a shell command: a loader that executes pickles would create d/pwned."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hf_folder(d: Path, config=HF_CONFIG) -> Path:
    (d / "src").mkdir()
    (d / "src" / "config.json").write_text(json.dumps(config))
    (d / "src" / "tokenizer.json").write_text("{}")  # only copied, never parsed, by the converter
    return d / "src"


def meta_folder(d: Path, params=META_PARAMS) -> Path:
    (d / "src").mkdir()
    (d / "src" / "params.json").write_text(json.dumps(params))
    (d / "src" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    return d / "src"


def convert(script: Path, src: Path, *extra, fragment: str = ""):
    return script, ["--checkpoint_dir", src, "--output_dir", src.parent / "out", *extra], {}, fragment


def evil_payload(d: Path, path: Path, writer: str) -> None:
    payload = {"model.embed_tokens.weight": Evil(d / "pwned")}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


# ---------------------------------------------------------------- conversion scenarios
# each returns (script, args, extra environment, a fragment the error line must contain)


@scenario(subprocess=True)
def hf_missing_dir(d):
    return convert(HF, d / "nope", fragment="nope")


@scenario(subprocess=True)
def meta_missing_dir(d):
    return convert(META, d / "nope", fragment="nope")


@scenario(subprocess=True)
def hf_dir_without_config_json(d):
    (d / "src").mkdir()
    (d / "src" / "notes.txt").write_text("hello")
    return convert(HF, d / "src", fragment="config.json")


@scenario(subprocess=True)
def meta_dir_without_params_json(d):
    (d / "src").mkdir()
    torch.save({}, d / "src" / "consolidated.00.pth")
    return convert(META, d / "src", fragment="params.json")


@scenario
def hf_config_json_not_json(d):
    src = hf_folder(d)
    (src / "config.json").write_text("{oops")
    return convert(HF, src, fragment="not valid JSON")


@scenario
def hf_config_json_not_llama(d):
    return convert(HF, hf_folder(d, {"model_type": "llama", "vocab_size": 32}), fragment="hidden_size")


@scenario(subprocess=True)
def hf_truncated_safetensors(d):
    from safetensors.torch import save_file

    src = hf_folder(d)
    save_file({"model.embed_tokens.weight": torch.randn(32, 16), "model.norm.weight": torch.ones(16)},
              str(src / "model.safetensors"))
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return convert(HF, src, fragment="truncated")


@scenario(subprocess=True)
def hf_bin_torch_save_runs_code(d):
    src = hf_folder(d)
    evil_payload(d, src / "pytorch_model.bin", "torch.save")
    return convert(HF, src, fragment="refusing to load")


@scenario
def hf_bin_plain_pickle_runs_code(d):
    src = hf_folder(d)
    evil_payload(d, src / "pytorch_model.bin", "pickle")
    return convert(HF, src, fragment="refusing to load")


@scenario
def meta_pth_torch_save_runs_code(d):
    src = meta_folder(d)
    evil_payload(d, src / "consolidated.00.pth", "torch.save")
    return convert(META, src, fragment="refusing to load")


@scenario(subprocess=True)
def meta_pth_plain_pickle_runs_code(d):
    src = meta_folder(d)
    evil_payload(d, src / "consolidated.00.pth", "pickle")
    return convert(META, src, fragment="refusing to load")


@scenario
def meta_params_disagree_with_weights(d):
    # params.json says dim 16, the weights are 8 wide: a clear error, not a failed reshape
    src = meta_folder(d)
    torch.save({"tok_embeddings.weight": torch.randn(32, 8), "norm.weight": torch.ones(8)},
               src / "consolidated.00.pth")
    return convert(META, src, fragment="shape")


@scenario
def meta_params_lack_dim(d):
    src = meta_folder(d, {k: v for k, v in META_PARAMS.items() if k != "dim"})
    torch.save({}, src / "consolidated.00.pth")
    return convert(META, src, fragment="dim")


@scenario
def meta_corrupt_tokenizer(d):
    # vocab_size -1, as Meta ships it: the size has to come from the (garbage) tokenizer
    src = meta_folder(d, {**META_PARAMS, "vocab_size": -1})
    torch.save({}, src / "consolidated.00.pth")
    return convert(META, src, fragment="sentencepiece")


@scenario
def hf_unknown_dtype(d):
    from safetensors.torch import save_file

    src = hf_folder(d)
    save_file({"model.norm.weight": torch.ones(16)}, str(src / "model.safetensors"))
    return convert(HF, src, "--dtype", "float8", fragment="float8")


# ---------------------------------------------------------------- download scenarios


@scenario(subprocess=True)
def download_offline(d):
    return DOWNLOAD, ["--repo_id", "HuggingFaceTB/SmolLM2-135M"], {"HF_HUB_OFFLINE": "1"}, \
        "cannot reach the Hugging Face hub to download HuggingFaceTB/SmolLM2-135M"


@scenario(subprocess=True)
def download_unreachable_endpoint(d):
    return DOWNLOAD, ["--repo_id", "HuggingFaceTB/SmolLM2-135M"], {"HF_ENDPOINT": "http://127.0.0.1:9"}, \
        "cannot reach the Hugging Face hub to download HuggingFaceTB/SmolLM2-135M"


@scenario(subprocess=True)
def download_gated_repo(d):
    return DOWNLOAD, ["--repo_id", "gated/model"], {"HF_ENDPOINT": FAKE_HUB}, "gated/model is gated"


@scenario(subprocess=True)
def download_unknown_repo(d):
    return DOWNLOAD, ["--repo_id", "nobody/nothing"], {"HF_ENDPOINT": FAKE_HUB}, "nobody/nothing was not found"


@scenario
def download_bad_repo_id(d):
    return DOWNLOAD, ["--repo_id", "no-slash"], {}, "org/name"


class FakeHub(BaseHTTPRequestHandler):
    """Answers every request the way the hub answers for a gated (403) or a missing (401) repo."""

    def do_GET(self):
        gated = "/gated/" in self.path
        self.send_response(403 if gated else 401)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


FAKE_HUB = ""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{scenario: (dir, expected fragment, exit code, stderr)} of the subprocess scenarios, run concurrently."""
    global FAKE_HUB
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FAKE_HUB = f"http://127.0.0.1:{server.server_port}"
    # a token or offline mode in the caller's environment must not change the answers
    base_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT")}

    def start(name):
        d = tmp_path_factory.mktemp(name)
        script, args, env, fragment = SCENARIOS[name](d)
        proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                              env={**base_env, **env}, cwd=d, timeout=120)
        return name, (d, fragment, proc.returncode, proc.stderr)

    try:
        with ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1)) as pool:
            return dict(pool.map(start, sorted(IN_SUBPROCESS)))
    finally:
        server.shutdown()


def run_in_process(name, tmp_path, monkeypatch, capsys):
    from lit_llama.utils import run_cli

    monkeypatch.chdir(tmp_path)
    script, args, env, fragment = SCENARIOS[name](tmp_path)
    assert not env, "scenarios that need another environment run in a subprocess"
    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # any exception but the SystemExit of run_cli's error path fails the test with its traceback
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, args=[str(a) for a in args])
    return tmp_path, fragment, exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bad_input_gives_one_error_line(name, request, tmp_path, monkeypatch, capsys):
    if name in IN_SUBPROCESS:
        d, fragment, code, stderr = request.getfixturevalue("results")[name]
    else:
        d, fragment, code, stderr = run_in_process(name, tmp_path, monkeypatch, capsys)
    assert code != 0
    assert "Traceback" not in stderr, stderr
    # the one line, after at most the conversion's progress bar (an error found mid-stream)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("converting:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert fragment in lines[0]
    assert not (d / "pwned").exists(), "a pickle's code was executed"
    assert not (d / "out").exists() and not (d / "checkpoints").exists()
