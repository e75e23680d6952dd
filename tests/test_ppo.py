"""PPO (lit_llama/align/ppo.py, finetune/ppo.py): GAE and the clipped losses against the formulas written
out independently, the KL-penalised rewards, the adaptive KL controller, the reference model (LoRA
switched off) against the base model, batched left-padded generation against one-at-a-time
generation, a PPO run that raises a scripted reward within a stated KL bound, and the CLI."""

import copy
import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import ROOT, run_script
from lit_llama.peft.lora import LoRAConfig, add_lora
from lit_llama.model import Config, LLaMA
from lit_llama.align.ppo import (AdaptiveKLController, FixedKLController, PolicyWithValueHead, PPOConfig, Rollouts,
                           compute_gae, generate_batch, kl_penalty_rewards, left_pad, load_value_head, lora_disabled,
                           ppo_losses, ppo_step, rollout_stats, save_value_head, train, whiten)


def lengths_mask(lengths, R):
    return (torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------- the math against the formulas


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_equals_the_discounted_sum_of_td_errors(gamma, lam):
    """Schulman et al. 2016, eq. 16: A_t = sum_l (gamma lam)^l delta_t+l, delta_t = r_t + gamma V_t+1 - V_t,
    with V = 0 after the last token (the episode ends there), computed here forwards, term by term."""
    g = torch.Generator().manual_seed(0)
    lengths, R = [5, 2, 7, 1], 7
    values, rewards = torch.randn(4, R, generator=g), torch.randn(4, R, generator=g)
    mask = lengths_mask(lengths, R)
    adv, ret = compute_gae(values, rewards, mask, gamma, lam)
    for b, L in enumerate(lengths):
        V = values[b].tolist()[:L] + [0.0]
        r = rewards[b].tolist()
        delta = [r[t] + gamma * V[t + 1] - V[t] for t in range(L)]
        for t in range(L):
            expected = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + V[t], abs=1e-5)
        assert torch.all(adv[b, L:] == 0)  # padding gets nothing
    # gamma = lam = 1: the advantage is the return-to-go minus the value
    adv1, _ = compute_gae(values, rewards, mask, 1.0, 1.0)
    for b, L in enumerate(lengths):
        for t in range(L):
            assert adv1[b, t].item() == pytest.approx(sum(rewards[b, t:L].tolist()) - values[b, t].item(), abs=1e-5)


def test_kl_penalty_rewards_put_the_score_on_the_last_token():
    g = torch.Generator().manual_seed(1)
    lengths, R, beta = [3, 1, 4], 4, 0.3
    lp, ref = torch.randn(3, R, generator=g), torch.randn(3, R, generator=g)
    scores = torch.tensor([2.0, -1.0, 0.5])
    mask = lengths_mask(lengths, R)
    rewards, kl = kl_penalty_rewards(lp, ref, scores, mask, beta)
    for b, L in enumerate(lengths):
        for t in range(R):
            expected = -beta * (lp[b, t] - ref[b, t]).item() if t < L else 0.0
            expected += scores[b].item() if t == L - 1 else 0.0
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
            assert kl[b, t].item() == pytest.approx((lp[b, t] - ref[b, t]).item() if t < L else 0.0, abs=1e-6)


def test_whiten_uses_only_the_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask)
    vals = [1.0, 2, 3, 4, 5]
    mean = sum(vals) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)  # unbiased, as TRL's masked_var
    assert w[0, :3].tolist() == pytest.approx([(v - mean) / std for v in vals[:3]], abs=1e-5)
    assert w[1, :2].tolist() == pytest.approx([(v - mean) / std for v in vals[3:]], abs=1e-5)


def test_clipped_losses_equal_the_per_token_formulas():
    """L_CLIP = E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)] (Schulman et al. 2017, eq. 7), the
    loss its negative; the value loss 0.5 max((V - G)^2, (V_old + clip(V - V_old, +-eps_v) - G)^2)."""
    eps, eps_v, c = 0.2, 0.2, 0.1
    # ratios inside and outside the clip range, advantages of both signs; the last token is padding
    old_lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.2, -2.5, -1.0]])
    log_ratio = torch.tensor([[0.0, 0.5, -0.5, 0.1], [0.3, -0.1, 0.25, 9.0]])
    adv = torch.tensor([[1.0, 2.0, -1.5, 0.5], [-1.0, 0.7, 1.2, 4.0]])
    old_v = torch.tensor([[0.1, 0.5, -0.3, 0.0], [1.0, 0.2, -0.4, 0.0]])
    v = torch.tensor([[0.2, 1.5, -0.35, 0.0], [0.2, 0.25, 0.1, 9.0]])
    ret = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.5, 0.3, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    lp = (old_lp + log_ratio).requires_grad_(True)
    loss, stats = ppo_losses(lp, v, old_lp, old_v, adv, ret, mask, eps, eps_v, c)

    pg, vf, clipped, n = 0.0, 0.0, 0, 0
    for b in range(2):
        for t in range(4):
            if not mask[b, t]:
                continue
            ratio = math.exp(log_ratio[b, t].item())
            A = adv[b, t].item()
            surrogate = min(ratio * A, min(max(ratio, 1 - eps), 1 + eps) * A)
            pg += -surrogate
            clipped += ratio * A > min(max(ratio, 1 - eps), 1 + eps) * A
            vo, vn, G = old_v[b, t].item(), v[b, t].item(), ret[b, t].item()
            vc = vo + min(max(vn - vo, -eps_v), eps_v)
            vf += 0.5 * max((vn - G) ** 2, (vc - G) ** 2)
            n += 1
    assert stats["pg_loss"].item() == pytest.approx(pg / n, abs=1e-6)
    assert stats["vf_loss"].item() == pytest.approx(vf / n, abs=1e-6)
    assert loss.item() == pytest.approx(pg / n + c * vf / n, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(clipped / n)
    # where the clip binds (ratio beyond the range in the direction A favours) the gradient is zero,
    # elsewhere it is -A ratio / n
    loss.backward()
    for b in range(2):
        for t in range(4):
            ratio, A = math.exp(log_ratio[b, t].item()), adv[b, t].item()
            binds = (A > 0 and ratio > 1 + eps) or (A < 0 and ratio < 1 - eps) or not mask[b, t]
            expected = 0.0 if binds else -A * ratio / n
            assert lp.grad[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)


def test_adaptive_kl_controller_follows_its_formula():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    expected = 0.2
    for kl, n in [(9.0, 32), (6.0, 32), (3.0, 64), (100.0, 16), (0.0, 16)]:
        ctl.update(kl, n)
        error = max(-0.2, min(0.2, kl / 6.0 - 1))  # the error is clipped to +-20%
        expected *= 1 + error * n / 10000
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert ctl.value != 0.2
    big = AdaptiveKLController(0.2, 6.0, 10000)
    big.update(60.0, 10000)  # ten times the target still moves beta by 20% at most per horizon
    assert big.value == pytest.approx(0.24)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 32)
    assert fixed.value == 0.05


# ---------------------------------------------------------------- models: reference, padding, generation


def tiny(name="tiny-gqa", seed=0, **overrides) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(Config.from_name(name, **overrides)).eval()


def lora_policy(base: LLaMA, config=LoRAConfig(r=4, alpha=8, dropout=0.0, mlp=True)) -> PolicyWithValueHead:
    model = add_lora(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B = 0 would make the LoRA model equal the base: give it a trained-like update
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return PolicyWithValueHead(model).eval()


def prompts_and_responses(vocab=500):
    g = torch.Generator().manual_seed(5)
    queries = [torch.randint(0, vocab, (n,), generator=g) for n in (4, 9, 1, 6)]
    responses = [torch.randint(0, vocab, (n,), generator=g) for n in (3, 1, 5, 2)]
    return queries, responses


def unpadded_logprobs(model: LLaMA, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """log p(r_t | q, r_<t) from the model's own forward on the unpadded sequence."""
    seq = torch.cat([q, r])[None]
    logits = model(seq)[0, len(q) - 1: len(q) - 1 + len(r)]
    return torch.log_softmax(logits.float(), -1).gather(-1, r[:, None]).squeeze(-1)


@torch.no_grad()
def test_reference_logprobs_with_lora_disabled_equal_the_base_models():
    base = tiny()
    policy = lora_policy(base)
    queries, responses = prompts_and_responses()
    batch = Rollouts.pack(queries, responses, pad_id=0)
    logprobs, values, ref = rollout_stats(policy, batch, chunk=2)
    for b, (q, r) in enumerate(zip(queries, responses)):
        L = len(r)
        torch.testing.assert_close(ref[b, :L], unpadded_logprobs(base, q, r), rtol=0, atol=2e-5)
        # the policy itself (LoRA on) is another model, and equals the LoRA model's forward
        assert not torch.allclose(logprobs[b, :L], ref[b, :L], atol=1e-3)
        torch.testing.assert_close(logprobs[b, :L], unpadded_logprobs(policy.model, q, r), rtol=0, atol=2e-5)
    assert values.shape == batch.mask.shape
    # the LoRA branches are back after the context
    with lora_disabled(policy):
        assert all(m.disabled for m in policy.modules() if hasattr(m, "lora_A"))
    assert not any(m.disabled for m in policy.modules() if hasattr(m, "lora_A"))


@torch.no_grad()
def test_left_padded_rows_compute_what_they_compute_alone():
    policy = lora_policy(tiny("tiny"))  # untied head, no grouped-query attention
    rows = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in (2, 8, 5)]
    idx, pad = left_pad(rows, pad_id=7)
    logits, values = policy(idx, pad)
    for b, row in enumerate(rows):
        torch.testing.assert_close(logits[b, pad[b]:], policy.model(row[None])[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(values[b, pad[b]:], policy.value_head(
            _final_hidden(policy.model, row)).squeeze(-1), rtol=0, atol=1e-5)


def _final_hidden(model, row):
    captured = {}
    handle = model.transformer.ln_f.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    model(row[None])
    handle.remove()
    return captured["h"][0]


def test_batched_generation_equals_one_prompt_at_a_time():
    from lit_llama.infer.generation import generate

    policy = lora_policy(tiny())
    queries, _ = prompts_and_responses()
    stop = 0
    batched = generate_batch(policy, queries, 6, temperature=0.0, stop_ids=(stop,), pad_id=stop)
    for q, got in zip(queries, batched):
        alone = list(generate(policy.model, q, 6, temperature=0.0, stop_ids=(stop,)))
        # generate does not yield the stop id; generate_batch keeps it as the response's last action
        want = alone + ([stop] if len(alone) < 6 else [])
        assert got.tolist() == want
    # sampling: every row gets at least one token and at most max_new_tokens
    torch.manual_seed(0)
    sampled = generate_batch(policy, queries, 5, temperature=1.0)
    assert [len(r) for r in sampled] == [5] * 4 and all(r.dtype == torch.long for r in sampled)


def test_first_update_starts_at_ratio_one_and_changes_only_lora_and_the_value_head():
    """With dropout off, the no-grad pass that records the old log-probs and the training pass see
    the same model: on one mini-batch of the whole batch the ratio is exactly 1."""
    policy = lora_policy(tiny())
    frozen = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k and "value_head" not in k}
    trained = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k or "value_head" in k}
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    queries, responses = prompts_and_responses()
    config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1)
    kl_ctl = AdaptiveKLController(0.2, 6.0, 10000)
    stats = ppo_step(policy, opt, queries, responses, torch.tensor([1.0, 0.0, -1.0, 2.0]), config, kl_ctl)
    assert stats["approx_kl"] < 1e-10 and stats["clipfrac"] == 0
    assert stats["score"] == pytest.approx(0.5) and stats["response_length"] == pytest.approx(11 / 4)
    # the batch was sampled from the policy, so its KL to the reference enters beta's update
    assert kl_ctl.value == pytest.approx(0.2 * (1 + max(-0.2, min(0.2, stats["kl"] / 6 - 1)) * 4 / 10000))
    state = policy.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in trained.items())


def test_value_head_file_roundtrip(tmp_path):
    policy = lora_policy(tiny())
    path = save_value_head(policy, tmp_path, {"step": 3})
    other = lora_policy(tiny(), LoRAConfig(r=4, alpha=8, dropout=0.0))
    assert not torch.equal(other.value_head.weight, policy.value_head.weight)
    assert load_value_head(other, path)["step"] == 3
    assert torch.equal(other.value_head.weight, policy.value_head.weight)


# ---------------------------------------------------------------- PPO raises a scripted reward


TARGETS = (3, 4, 5, 6)  # 4 of 32 tokens: about one response token in eight at the start


def test_ppo_raises_a_scripted_reward_within_the_kl_bound():
    """The reward is +1 per target token in an 8-token response (at most 8). The base is a tiny random
    model whose head is scaled up so that a LoRA on q and v can move its distribution at all.

    The bound: PPO maximizes J(pi) = E_pi[score] - beta KL(pi || ref), and J(ref) = E_ref[score]; any
    policy at least as good as the reference under J has beta KL <= E_pi[score] - E_ref[score] <=
    8 - E_ref[score]. So we check that J improved and that KL < (8 - E_ref[score]) / beta, with
    E_ref[score] measured at step 1, when the policy still is the reference (LoRA's B starts at 0)."""
    torch.manual_seed(0)
    base = LLaMA(Config.from_name("tiny", vocab_size=32, padding_multiple=32))
    with torch.no_grad():
        base.lm_head.weight.mul_(6)  # logits of std ~1 instead of ~0.16
    policy = PolicyWithValueHead(add_lora(base.eval(), LoRAConfig(r=8, alpha=16, dropout=0.0)))
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    beta = 0.2
    config = PPOConfig(batch_size=16, mini_batch_size=4, max_new_tokens=8, learning_rate=3e-3, init_kl_coef=beta,
                       adaptive_kl=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32, (n,), generator=g) for n in range(2, 12)]

    def reward(queries, responses):
        return torch.tensor([float(sum(int(t) in TARGETS for t in r)) for r in responses])

    history = train(policy, opt, prompts, reward, config, steps=40, log=lambda line: None)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    first, last = history[:5], history[-5:]
    ref_score = history[0]["score"]
    objective = lambda rows: mean(rows, "score") - beta * mean(rows, "kl")
    print(f"score {mean(first, 'score'):.2f} -> {mean(last, 'score'):.2f}, KL {mean(last, 'kl'):.2f}, "
          f"bound {(8 - ref_score) / beta:.1f}, J {objective(first):.2f} -> {objective(last):.2f}")
    assert mean(last, "score") > mean(first, "score") + 2
    assert objective(last) > ref_score
    assert mean(last, "kl") < (8 - ref_score) / beta
    assert all(r["response_length"] == 8 for r in history)


# ---------------------------------------------------------------- the CLI


def _ppo_main():
    spec = importlib.util.spec_from_file_location("finetune_ppo", ROOT / "finetune" / "ppo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_tokenizer(folder, vocab=500):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny checkpoint with a reward model for it, and a reward model for another base."""
    from lit_llama.io.checkpoint import load_model, save_checkpoint
    from lit_llama.align.reward import build_reward_model, save_reward_model

    d = tmp_path_factory.mktemp("ppo_cli")
    (d / "tok").mkdir()
    write_tokenizer(d / "tok")
    save_checkpoint(d / "base", tiny("tiny"), tokenizer_dir=d / "tok")
    save_reward_model(build_reward_model(load_model(d / "base"), LoRAConfig(r=2)), d / "reward")
    save_reward_model(build_reward_model(tiny("tiny-gqa"), LoRAConfig(r=2)), d / "other_reward")
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"t{i} t{i + 1} t{i + 2}"}) for i in range(6)))
    (d / "empty.json").write_text("[]")
    return d


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["ppo.py", *map(str, args)])
    from lit_llama.utils import run_cli

    try:
        run_cli(_ppo_main())
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_documents_every_flag():
    r = run_script("finetune/ppo.py", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--checkpoint_dir", "--reward_path", "--prompts_file", "--out_dir", "--steps", "--batch_size",
                 "--mini_batch_size", "--ppo_epochs", "--init_kl_coef", "--target_kl", "--adaptive_kl",
                 "--max_new_tokens", "--learning_rate", "--seed"):
        assert flag in r.stdout
    # jsonargparse takes each flag's help from the docstring: none may be undocumented
    assert "(required, type:" not in r.stdout
    import inspect

    assert all(f"{name}:" in _ppo_main().__doc__ for name in inspect.signature(_ppo_main()).parameters)


def test_cli_trains_saves_and_bad_input_is_one_line_leaving_the_output_alone(tmp_path, ckpts, monkeypatch, capsys):
    from lit_llama.peft.lora import load_lora

    out = tmp_path / "out"
    common = ["--checkpoint_dir", ckpts / "base", "--reward_path", ckpts / "reward", "--out_dir", out,
              "--steps", "2", "--batch_size", "2", "--mini_batch_size", "1", "--ppo_epochs", "1",
              "--max_new_tokens", "3", "--lora_r", "2"]
    code, stdout, err = run_main(monkeypatch, capsys, *common, "--prompts_file", ckpts / "prompts.jsonl")
    assert code == 0, err
    assert "6 prompts" in stdout and "step 2/2 | score" in stdout
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"lit_lora.safetensors", "value_head.safetensors", "ppo_config.json"} <= set(files)
    load_lora(tiny("tiny"), out)  # loadable as an ordinary LoRA onto the base

    cases = [
        (["--prompts_file", tmp_path / "nothing.json"], "does not exist"),
        (["--prompts_file", ckpts / "empty.json"], "holds no prompts"),
        (["--prompts_file", ckpts / "prompts.jsonl", "--checkpoint_dir", tmp_path / "nockpt"], "does not exist"),
        (["--prompts_file", ckpts / "prompts.jsonl", "--reward_path", ckpts / "other_reward"],
         "was trained on base"),
        (["--prompts_file", ckpts / "prompts.jsonl", "--reward_path", tmp_path / "noreward"], "does not exist"),
        (["--prompts_file", ckpts / "prompts.jsonl", "--batch_size", "3", "--mini_batch_size", "2"],
         "must be a multiple of"),
    ]
    for extra, message in cases:
        code, _, err = run_main(monkeypatch, capsys, *common, *extra)
        assert code == 1, (extra, err)
        assert err.startswith("error:") and message in err and err.count("\n") == 1, (extra, err)
        assert "Traceback" not in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing overwritten


def test_cli_bad_input_in_a_subprocess_is_one_line(tmp_path, ckpts):
    r = run_script("finetune/ppo.py", "--checkpoint_dir", ckpts / "base", "--reward_path", ckpts / "reward",
                   "--prompts_file", ckpts / "empty.json", "--out_dir", tmp_path / "out")
    assert r.returncode == 1
    assert r.stderr.startswith("error:") and "holds no prompts" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_prompt_files_in_every_form(tmp_path):
    from lit_llama.align.ppo import read_prompt_texts
    from lit_llama.templates import instruction_prompt
    from lit_llama.utils import UserError

    rows = ["plain text", {"prompt": "verbatim: "}, {"question": "Why?", "response_j": "a", "response_k": "b"},
            {"instruction": "Do it.", "input": "now"}, {"prompt": "verbatim: ", "chosen": "x", "rejected": "y"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    expected = ["plain text", "verbatim: ", "Question: Why?\n\nAnswer: ", instruction_prompt("Do it.", "now")]
    assert read_prompt_texts(tmp_path / "p.jsonl") == expected  # the repeated prompt is kept once
    assert read_prompt_texts(tmp_path / "p.json") == expected
    (tmp_path / "bad.json").write_text(json.dumps([{"answer": 1}]))
    with pytest.raises(UserError, match="record 0 is neither"):
        read_prompt_texts(tmp_path / "bad.json")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompt_texts(tmp_path / "blank.jsonl")


# ---------------------------------------------------------------- resume


class _Killed(Exception):
    pass


def _ppo_run(out_dir, resume=False, die_at=None):
    """A 4-step PPO run with everything that carries state across steps: LoRA dropout (the RNG),
    the adaptive KL coefficient, a prompt epoch longer than a batch, Adam's moments, the warmup.
    With `die_at`, the run stops as a killed process would, at the start of that step."""
    from lit_llama.utils import make_fabric

    fabric = make_fabric("32-true")
    torch.manual_seed(0)
    base = LLaMA(Config.from_name("tiny", vocab_size=32, padding_multiple=32))
    policy = PolicyWithValueHead(add_lora(base, LoRAConfig(r=4, alpha=8, dropout=0.2)))
    for p in policy.value_head.parameters():
        p.requires_grad_(True)
    policy = fabric.setup_module(policy)
    opt = fabric.setup_optimizers(torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3))
    config = PPOConfig(batch_size=4, mini_batch_size=2, max_new_tokens=4, learning_rate=1e-3, warmup_steps=3,
                       adaptive_kl=True, target_kl=0.01, kl_horizon=100)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32, (n,), generator=g) for n in range(2, 8)]  # 6 prompts: epochs of 1.5 batches
    calls = []

    def reward(queries, responses):
        calls.append(1)
        if die_at is not None and len(calls) == die_at:
            raise _Killed
        return torch.tensor([float(sum(int(t) < 8 for t in r)) for r in responses])

    history = train(policy, opt, prompts, reward, config, steps=4, fabric=fabric, save_interval=2,
                    out_dir=out_dir, resume=resume, log=lambda line: None)
    weights = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    return history, weights


def test_resume_after_a_crash_continues_exactly_as_the_uninterrupted_run(tmp_path):
    history, weights = _ppo_run(tmp_path / "straight")
    with pytest.raises(_Killed):
        _ppo_run(tmp_path / "crashed", die_at=3)  # dies in step 3, after step 2's save
    assert sorted(p.name for p in (tmp_path / "crashed").glob("step-*.ckpt")) == ["step-000002.ckpt"]
    resumed_history, resumed_weights = _ppo_run(tmp_path / "crashed", resume=True)
    assert [r["step"] for r in resumed_history] == [3, 4]
    for key in ("score", "kl", "kl_coef", "pg_loss", "vf_loss", "lr"):
        assert [r[key] for r in resumed_history] == pytest.approx([r[key] for r in history[2:]], rel=1e-5, abs=1e-7), key
    assert resumed_weights.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(resumed_weights[name], weights[name], rtol=1e-5, atol=1e-6, msg=name)
