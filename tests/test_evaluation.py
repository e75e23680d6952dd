"""Perplexity evaluation (lit_llama/eval/perplexity.py and the four evaluate/ scripts, float and
quantized, with LoRA and adapters) and the lm-eval harness adapter, on a tiny random model with the
embedded model's tokenizer."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from lit_llama.eval.perplexity import perplexity
from lit_llama.quant.gptq import GPTQSettings, default_calibration_text, quantize_checkpoint
from quant_helpers import assert_one_error_line, calibration_file, run_main, tiny_checkpoint

SEQLEN = 64


@pytest.fixture(scope="module")
def setup(default_checkpoint, tmp_path_factory):
    """(float checkpoint, its 4-bit GPTQ version, finetuned weights of every kind, evaluation text)."""
    from lit_llama.peft.adapter import AdapterConfig, add_adapter, save_adapter
    from lit_llama.peft.adapter_v2 import add_adapter_v2, save_adapter_v2
    from lit_llama.io.checkpoint import load_model
    from lit_llama.peft.lora import LoRAConfig, add_lora, save_lora

    tmp = tmp_path_factory.mktemp("eval")
    src = tiny_checkpoint(tmp, default_checkpoint, seed=2)
    gptq = tmp / "gptq"
    quantize_checkpoint(src, gptq, GPTQSettings(bits=4, groupsize=64), text_file=calibration_file(tmp), nsamples=4,
                        seqlen=64, device="cpu")
    torch.manual_seed(3)
    files = {}
    # finetuned parameters made non-trivial, so that loading them changes the perplexity
    for kind, add, save in (("lora", lambda m: add_lora(m, LoRAConfig()), save_lora),
                            ("adapter", lambda m: add_adapter(m, AdapterConfig(start_layer=1)), save_adapter),
                            ("adapter_v2", lambda m: add_adapter_v2(m, AdapterConfig(start_layer=1)), save_adapter_v2)):
        model = add(load_model(src))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        files[kind] = save(model, tmp / f"{kind}.safetensors")
    text = tmp / "eval.txt"
    text.write_text(default_calibration_text()[-3000:])
    return src, gptq, files, text


def wrap_for(kind, files):
    from lit_llama.peft.adapter import load_adapter
    from lit_llama.peft.adapter_v2 import load_adapter_v2
    from lit_llama.peft.lora import load_lora

    load = {"lora": load_lora, "adapter": load_adapter, "adapter_v2": load_adapter_v2}.get(kind)
    return None if load is None else (lambda m: load(m, files[kind]))


_expected = {}


def expected_perplexity(checkpoint, text: Path, kind=None, files=None, quantize=None) -> float:
    """The library's perplexity for a configuration, computed once per test session."""
    from lit_llama.infer.load import load_for_inference

    key = (str(checkpoint), kind, quantize)
    if key not in _expected:
        fabric, model, tokenizer = load_for_inference(checkpoint, None, wrap_for(kind, files), quantize)
        _expected[key] = perplexity(model, tokenizer.encode(text.read_text()), SEQLEN, fabric.device)
    return _expected[key]


# script, flag for the finetuned file, base ("float" or "gptq"), --quantize
RUNS = {
    "full-float": ("full", None, "float", None),
    "full-gptq": ("full", None, "gptq", "gptq.int4"),
    "lora-int8": ("lora", "--lora_path", "float", "llm.int8"),
    "lora-gptq": ("lora", "--lora_path", "gptq", "gptq.int4"),
    "adapter-gptq": ("adapter", "--adapter_path", "gptq", "gptq.int4"),
    "adapter_v2-int8": ("adapter_v2", "--adapter_path", "float", "llm.int8"),
    "adapter_v2-gptq": ("adapter_v2", "--adapter_path", "gptq", "gptq.int4"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_evaluate_scripts_print_the_perplexity_last(name, setup, monkeypatch, capsys):
    src, gptq, files, text = setup
    script, flag, base, quantize = RUNS[name]
    checkpoint = src if base == "float" else gptq
    args = ["--checkpoint_dir", checkpoint, "--text_file", text, "--seqlen", SEQLEN]
    args += [flag, files[script]] if flag else []
    args += ["--quantize", quantize] if quantize else []
    out, err = run_main(f"evaluate/{script}.py", args, monkeypatch, capsys, expect_exit=False)
    assert "Traceback" not in err
    last = out.strip().splitlines()[-1]
    assert last.startswith("perplexity: "), out
    value = float(last.split()[1])
    expected = expected_perplexity(checkpoint, text, script if flag else None, files, quantize)
    # the script computes exactly what the library does; int8 activations are quantized per call
    assert value == pytest.approx(expected, rel=1e-2 if quantize == "llm.int8" else 1e-4)
    if flag:  # the finetuned weights are really applied
        assert value != pytest.approx(expected_perplexity(checkpoint, text, None, files, quantize), rel=1e-3)


def test_perplexity_is_exp_of_the_mean_nll_over_whole_windows():
    from lit_llama.model import Config, LLaMA

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny")).eval()
    tokens = torch.randint(0, 500, (3 * 16 + 7,))  # three windows of 16; the last 7 tokens are left out
    nll = []
    with torch.no_grad():
        for i in range(3):
            w = tokens[16 * i:16 * (i + 1)]
            nll.append(F.cross_entropy(model(w[None])[0, :-1], w[1:], reduction="none"))
    expected = math.exp(torch.cat(nll).mean().item())
    assert perplexity(model, tokens, 16, "cpu") == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tokens, 16, "cpu", max_windows=1) == pytest.approx(math.exp(nll[0].mean().item()), rel=1e-5)


# ---------------------------------------------------------------- bad input, in this process


def test_unreachable_dataset_is_one_error_line(setup):
    pytest.importorskip("datasets")
    # offline mode makes the hub client fail at once; where the hub cannot be reached it gives up
    # after its retries (about 30 s) with the same line
    r = run_script("evaluate/full.py", "--checkpoint_dir", setup[0], "--dataset", "wikitext2",
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_one_error_line(r.returncode, r.stderr, "cannot load the wikitext2 dataset", "--text_file")


@pytest.mark.parametrize("case", ["short-text", "missing-text", "text-and-dataset", "long-seqlen"])
def test_bad_evaluation_input_is_one_error_line(case, setup, tmp_path, monkeypatch, capsys):
    src, _, _, text = setup
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    args, words = {
        "short-text": (["--text_file", short], ["fewer than one window of 64"]),
        "missing-text": (["--text_file", tmp_path / "nope.txt"], ["nope.txt", "does not exist"]),
        "text-and-dataset": (["--text_file", text, "--dataset", "ptb"], ["not both"]),
        "long-seqlen": (["--text_file", text, "--seqlen", "100000"], ["longer than the model's context"]),
    }[case]
    args = ["--checkpoint_dir", src, *args] + (["--seqlen", SEQLEN] if "--seqlen" not in args else [])
    code, err = run_main("evaluate/full.py", args, monkeypatch, capsys)
    assert_one_error_line(code, err, *words)


# ---------------------------------------------------------------- lm-eval harness


@pytest.fixture(scope="module")
def harness_model(setup):
    pytest.importorskip("lm_eval")
    from lit_llama.eval.harness import LitLLaMALM

    return LitLLaMALM(str(setup[0]), max_length=16, max_gen_toks=6)


class Request:  # what the harness hands a model: an object with .args
    def __init__(self, *args):
        self.args = args


def logprobs(lm, tokens):
    with torch.no_grad():
        return F.log_softmax(lm.model(torch.tensor(tokens)[None])[0].float(), -1)


def test_harness_loglikelihood_is_the_continuations_log_probability(harness_model):
    lm = harness_model
    (ll, greedy), = lm.loglikelihood([Request("The capital of France is", " Paris")])
    ctx, cont = lm._encode_pair("The capital of France is", " Paris")
    lp = logprobs(lm, ctx + cont)
    expected = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy == all(lp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))


def test_harness_rolling_loglikelihood_scores_every_token_once(harness_model):
    lm = harness_model
    text = "Python is a programming language that lets you work quickly and integrate systems effectively. " * 3
    tokens = lm.tok_encode(text, add_special_tokens=False)
    assert len(tokens) > 2 * lm.max_length  # several windows
    (ll,) = lm.loglikelihood_rolling([Request(text)])
    # windows of max_length predictions, each input reaching as far back as max_length allows
    # (the first one starts from the prefix token)
    L, padded, expected = lm.max_length, [lm.prefix_token_id] + tokens, 0.0
    for start in range(0, len(tokens), L):
        end = min(start + L, len(tokens))
        inputs = padded[max(0, end - L):end]
        lp = logprobs(lm, inputs)
        k = end - start
        expected += sum(lp[len(inputs) - k + j, tokens[start + j]].item() for j in range(k))
    assert ll == pytest.approx(expected, abs=1e-3)


def test_harness_generation_stops_at_the_stop_string(harness_model):
    lm = harness_model
    (free,) = lm.generate_until([Request("Once upon a time", {"until": ["<never>"], "max_gen_toks": 6})])
    assert free and len(lm.tok_encode(free, add_special_tokens=False)) <= 6
    stop = free[len(free) // 2:len(free) // 2 + 2]
    (cut,) = lm.generate_until([Request("Once upon a time", {"until": [stop], "max_gen_toks": 6})])
    assert cut == free[:free.index(stop)]


def test_harness_runs_a_multiple_choice_task(harness_model, tmp_path):
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    lm = harness_model
    data = tmp_path / "data.jsonl"
    docs = [{"q": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
            {"q": "Two plus two is", "choices": [" four", " five"], "answer": 1}]
    import json

    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    tasks = get_task_dict(["tiny_choice"], TaskManager(include_path=str(tmp_path), include_defaults=False))
    acc = evaluate(lm=lm, task_dict=tasks)["results"]["tiny_choice"]["acc,none"]
    # the harness's accuracy: the choice of highest log-likelihood, per document
    right = 0
    for d in docs:
        scores = [s for s, _ in lm.loglikelihood([Request(d["q"], c) for c in d["choices"]])]
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    assert acc == pytest.approx(right / len(docs))
