"""The alignment pipeline end to end on a tiny model, each stage a subprocess as a user runs it:
SFT (finetune/full.py on instruction data from scripts/prepare_alpaca.py) -> preference pairs
(scripts/prepare_preferences.py, tokenised for the SFT'd model) -> reward model
(finetune/reward_model.py) -> PPO (finetune/ppo.py against that reward model) -> the PPO LoRA
answers through generate/lora.py. Each stage must write its output and the next one must read it."""

import json
import re

import pytest
import torch

from conftest import run_script
from lit_llama.io.checkpoint import save_checkpoint
from lit_llama.model import Config, LLaMA

WORDS = ["apple", "river", "stone", "cloud", "green", "piano", "tiger", "lemon"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, default_checkpoint):
    """A tiny random model with the embedded model's tokenizer (49152 tokens)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("align") / "tiny"
    save_checkpoint(path, LLaMA(Config.from_name("tiny", vocab_size=49152)), tokenizer_dir=default_checkpoint)
    return path


def _ok(r, *outputs):
    assert r.returncode == 0, r.stderr[-3000:]
    for path in outputs:
        assert path.exists(), f"{path} was not written; stdout: {r.stdout[-2000:]}"


def test_sft_reward_model_ppo_pipeline(tmp_path, tiny_ckpt):
    from lit_llama.templates import instruction_prompt

    # 1. SFT: a few full-finetuning steps on instruction data
    sft_data = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"} for w in WORDS * 2]
    (tmp_path / "sft.json").write_text(json.dumps(sft_data))
    r = run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", tiny_ckpt, "--data_file_path",
                   tmp_path / "sft.json", "--destination_path", tmp_path / "sft_data", "--val_fraction", "0")
    _ok(r, tmp_path / "sft_data" / "train.pt")
    r = run_script("finetune/full.py", "--checkpoint_dir", tiny_ckpt, "--data_dir", tmp_path / "sft_data",
                   "--out_dir", tmp_path / "sft", "--max_iters", "2", "--global_batch_size", "4",
                   "--micro_batch_size", "4", "--learning_rate", "1e-3", "--warmup_iters", "1",
                   "--eval_interval", "100", "--save_interval", "100")
    sft = tmp_path / "sft" / "final"
    _ok(r, sft / "lit_model.safetensors", sft / "tokenizer.json")

    # 2. preference pairs for the SFT'd model: the repeated word is preferred to another word
    rows = [{"prompt": instruction_prompt(f"Repeat the word {w}."), "chosen": f"{w} {w} {w}",
             "rejected": f"{WORDS[(i + 1) % len(WORDS)]} no"} for i, w in enumerate(WORDS)]
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    r = run_script("scripts/prepare_preferences.py", "--checkpoint_dir", sft, "--data_file_path",
                   tmp_path / "prefs.jsonl", "--destination_path", tmp_path / "prefs", "--val_fraction", "0")
    _ok(r, tmp_path / "prefs" / "train.pt")

    # 3. the reward model, LoRA and a scalar head on the SFT'd model
    r = run_script("finetune/reward_model.py", "--checkpoint_dir", sft, "--data_dir", tmp_path / "prefs",
                   "--out_dir", tmp_path / "reward", "--max_iters", "2", "--global_batch_size", "4",
                   "--micro_batch_size", "4", "--learning_rate", "1e-3", "--warmup_iters", "1",
                   "--eval_interval", "100", "--save_interval", "100", "--lora_r", "4")
    _ok(r, tmp_path / "reward" / "lit_reward.safetensors")

    # 4. PPO on the prepared pairs' prompts against that reward model
    r = run_script("finetune/ppo.py", "--checkpoint_dir", sft, "--reward_path", tmp_path / "reward",
                   "--prompts_file", tmp_path / "prefs", "--out_dir", tmp_path / "ppo", "--steps", "3",
                   "--batch_size", "4", "--mini_batch_size", "2", "--ppo_epochs", "2", "--max_new_tokens", "6",
                   "--learning_rate", "1e-3", "--lora_r", "4", "--save_interval", "2")
    _ok(r, tmp_path / "ppo" / "lit_lora.safetensors", tmp_path / "ppo" / "value_head.safetensors")
    assert f"reward model {tmp_path / 'reward'}" in r.stdout and f"{len(WORDS)} prompts" in r.stdout
    lines = [l for l in r.stdout.splitlines() if re.match(r"step \d+/3 \| score", l)]
    assert len(lines) == 3, r.stdout
    # the scores come from the reward model: finite, and not all the same
    scores = [float(re.search(r"score (\S+)", l).group(1)) for l in lines]
    assert all(abs(s) < 1e3 for s in scores) and len(set(scores)) > 1, scores
    assert json.loads((tmp_path / "ppo" / "ppo_config.json").read_text())["step"] == 3

    # 5. the PPO LoRA is an ordinary LoRA file for the SFT'd model
    r = run_script("generate/lora.py", "--checkpoint_dir", sft, "--lora_path", tmp_path / "ppo",
                   "--prompt", "Repeat the word apple.", "--max_new_tokens", "4")
    _ok(r)
