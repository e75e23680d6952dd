"""The batched engine (lit_llama/infer/engine.py) on the embedded model in float32: each request served in a
batch gets the greedy tokens `generation.generate` gives it alone, whatever its neighbours and
arrival step (eager and compiled); the prefix cache changes nothing but the work; chunked prefill
lets running requests go on; seeds, stop strings, cancellation and limits."""

import os

import pytest
import torch

from conftest import assert_same_greedy
from lit_llama.infer.engine import Engine, EngineFull, Request, SamplingParams, cache_row_bytes
from lit_llama.infer.generation import generate
from lit_llama.utils import UserError

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "Explain gravity to a child in two sentences.", "What is 12 times 12?", "Say hello.",
             "List the planets of the solar system, closest to the sun first, with one fact about each.",
             "Why is the sky blue?"]


@pytest.fixture(scope="module")
def model(default_checkpoint):
    from lit_llama.infer.load import load_for_inference

    _, model, tokenizer = load_for_inference(default_checkpoint, "32-true")
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(model):
    from lit_llama.templates import ChatFormat, get_template

    _, tokenizer = model
    fmt = ChatFormat(get_template("checkpoint", tokenizer), tokenizer)
    # prompt lengths from about 30 to about 60 tokens, and one long one (a few chunks of prefill)
    out = [fmt.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    out[3] = fmt.prompt_ids([{"role": "user", "content": "Summarize: " + "The quick brown fox jumps over the lazy dog. " * 40}])
    return out


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each prompt's greedy tokens from generation.generate, one at a time."""
    m, _ = model
    out = [list(generate(m, torch.tensor(p), 16)) for p in prompts]
    m.clear_kv_cache()
    return out


def arrive(engine: Engine, requests, every: int = 2):
    """Submit the requests `every` steps apart (the first ones mid-decode of the earlier), then run."""
    for r in requests:
        engine.submit(r)
        for _ in range(every):
            engine.step()
    while not all(r.finish_reason for r in requests):
        engine.step()
    return requests


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_batched_greedy_equals_each_request_alone(model, prompts, alone, compile):
    m, tok = model
    # compiled: one graph per batch size (1, 2, 4) and key length; rows of 255 positions have one
    # key length (256), so three graphs, and the long prompt does not fit
    chosen = [i for i in range(8) if not compile or i != 3]
    engine = Engine(m, tok, max_batch_size=4, max_seq_length=255 if compile else 768, prefill_chunk=128,
                    compile=compile)
    requests = arrive(engine, [Request(prompts[i], SamplingParams(max_new_tokens=16)) for i in chosen])
    for i, r in zip(chosen, requests):
        assert r.finish_reason == "length"
        assert_same_greedy(m, torch.tensor(prompts[i]), alone[i], r.tokens)
    s = engine.stats
    # the batch really ran several rows per step (at most 4)
    assert 2 < s["decode_rows"] / s["steps"] <= 4 and s["finished"] == len(chosen), s
    assert not engine.decoding and not engine.prefilling and all(row.owner is None for row in engine.rows)
    m.clear_kv_cache()


def test_prefill_is_chunked_and_the_batch_keeps_decoding(model, prompts, alone):
    m, tok = model
    engine = Engine(m, tok, max_batch_size=4, max_seq_length=768, prefill_chunk=64)
    first = Request(prompts[0], SamplingParams(max_new_tokens=16))
    engine.submit(first)
    engine.step()  # prefilled: its first token
    long = Request(prompts[3], SamplingParams(max_new_tokens=16))
    engine.submit(long)
    chunks = -(-len(prompts[3]) // 64)
    assert chunks >= 4
    before = len(first.tokens)
    while long.first_token_time is None:
        engine.step()
    # one decode step of the running request per chunk of the newcomer's prompt
    assert len(first.tokens) - before == chunks
    engine.run([first, long])
    assert_same_greedy(m, torch.tensor(prompts[3]), alone[3], long.tokens)
    assert_same_greedy(m, torch.tensor(prompts[0]), alone[0], first.tokens)
    m.clear_kv_cache()


def test_prefix_cache_reuses_keys_and_values_and_changes_nothing(model, prompts):
    from lit_llama.templates import ChatFormat, get_template

    m, tok = model
    fmt = ChatFormat(get_template("checkpoint", tok), tok)
    engine = Engine(m, tok, max_batch_size=2, max_seq_length=768, cache_rows=4)
    turn1 = [{"role": "user", "content": QUESTIONS[6]}]
    a = engine.run([Request(fmt.prompt_ids(turn1), SamplingParams(max_new_tokens=24))])[0]
    assert a.cached_tokens == 0
    turn2 = turn1 + [{"role": "assistant", "content": tok.decode(a.tokens)}, {"role": "user", "content": "And the moon?"}]
    ids2 = fmt.prompt_ids(turn2)
    b = engine.run([Request(ids2, SamplingParams(max_new_tokens=12))])[0]
    # the first turn's prompt and answer (all but its last token, never fed back) came from the cache
    shared = len(os.path.commonprefix([a.prompt + a.tokens, ids2]))
    assert b.cached_tokens == min(shared, len(a.prompt) + len(a.tokens) - 1) > len(a.prompt)
    assert engine.stats["prefix_cache_hits"] == 1 and engine.stats["cached_prompt_tokens"] == b.cached_tokens
    want = list(generate(m, torch.tensor(ids2), 12, stop_ids=()))
    m.clear_kv_cache()
    engine = Engine(m, tok, max_batch_size=2, max_seq_length=768, cache_rows=4)
    assert_same_greedy(m, torch.tensor(ids2), want, b.tokens)
    # a prompt shared with no row is computed in full in the least recently used row
    c = engine.run([Request(prompts[1], SamplingParams(max_new_tokens=4))])[0]
    assert c.cached_tokens == 0
    m.clear_kv_cache()


def test_seeded_sampling_does_not_depend_on_the_neighbours(model, prompts):
    m, tok = model
    engine = Engine(m, tok, max_batch_size=4, max_seq_length=512)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=42)
    lone = engine.run([Request(prompts[2], params)])[0].tokens
    batch = [Request(prompts[2], params), Request(prompts[0], SamplingParams(max_new_tokens=12, temperature=1.0)),
             Request(prompts[2], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=43))]
    engine.run(batch)
    assert batch[0].tokens == lone
    assert batch[2].tokens != lone  # another seed, another sample
    m.clear_kv_cache()


def test_stop_ids_stop_strings_and_limits(model, prompts):
    m, tok = model
    engine = Engine(m, tok, max_batch_size=2, max_seq_length=128)
    free = engine.run([Request(prompts[6], SamplingParams(max_new_tokens=40))])[0]
    text = tok.decode(free.tokens)
    word = text.split()[3]
    stop = engine.run([Request(prompts[6], SamplingParams(max_new_tokens=40, stop_strings=(word,)))])[0]
    assert stop.finish_reason == "stop" and stop.text == text[: text.index(word)]
    by_id = engine.run([Request(prompts[6], SamplingParams(max_new_tokens=40, stop_ids=(free.tokens[5],)))])[0]
    assert by_id.finish_reason == "stop" and by_id.tokens == free.tokens[:5]
    # a sequence ends at its row's capacity
    room = 128 - len(prompts[6])
    full = engine.run([Request(prompts[6], SamplingParams(max_new_tokens=1000))])[0]
    assert full.finish_reason == "length" and len(full.tokens) == room
    m.clear_kv_cache()


def test_cancel_a_running_and_a_waiting_request(model, prompts):
    m, tok = model
    updates = []
    engine = Engine(m, tok, max_batch_size=1, max_seq_length=256)
    running = Request(prompts[0], SamplingParams(max_new_tokens=100), on_update=lambda r, piece: updates.append(r.id))
    waiting = Request(prompts[1], SamplingParams(max_new_tokens=100))
    engine.submit(running, waiting)
    for _ in range(3):
        engine.step()
    # the first step prefills it and decodes its second token
    assert len(running.tokens) == 4 and engine.queued() == 1 and not waiting.tokens
    running.cancel()
    waiting.cancel()
    engine.step()
    assert (running.finish_reason, waiting.finish_reason) == ("cancelled", "cancelled")
    assert running.done.is_set() and waiting.done.is_set() and len(running.tokens) == 4
    assert not engine.busy and engine.queued() == 0 and engine.stats["cancelled"] == 2
    # the row is free again: the next request runs
    assert engine.run([Request(prompts[1], SamplingParams(max_new_tokens=2))])[0].finish_reason == "length"
    m.clear_kv_cache()


def test_bad_requests_and_a_full_queue(model):
    m, tok = model
    with pytest.raises(UserError, match="--max_batch_size must be at least 1"):
        Engine(m, tok, max_batch_size=0)
    engine = Engine(m, tok, max_batch_size=1, max_seq_length=64, max_waiting=2)
    with pytest.raises(UserError, match="at most 64"):
        engine.submit(Request(list(range(64))))
    with pytest.raises(UserError, match="empty"):
        engine.submit(Request([]))
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.submit(Request([1, 10 ** 6]))
    engine.submit(Request([1, 2]), Request([1, 3]))
    with pytest.raises(EngineFull):
        engine.submit(Request([1, 4]))
    assert engine.queued() == 2  # all or none: nothing of the refused call was queued
    c = m.config
    assert cache_row_bytes(m, 64) == 2 * c.n_layer * c.n_query_groups * 65 * c.head_size * 4
    m.clear_kv_cache()


def test_a_thread_serves_requests_submitted_from_others(model, prompts, alone):
    import threading

    m, tok = model
    engine = Engine(m, tok, max_batch_size=4, max_seq_length=512).start()
    try:
        requests = [Request(p, SamplingParams(max_new_tokens=16)) for p in prompts[:3]]
        threads = [threading.Thread(target=engine.submit, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        for r in requests:
            assert r.wait(120).finish_reason == "length"
        for p, want, r in zip(prompts, alone, requests):
            assert_same_greedy(m, torch.tensor(p), want, r.tokens)
    finally:
        engine.close()
    m.clear_kv_cache()


def test_without_the_prefix_cache_every_prompt_is_computed(model, prompts):
    m, tok = model
    engine = Engine(m, tok, max_batch_size=1, max_seq_length=256, prefix_cache=False)
    a, b = engine.run([Request(prompts[0], SamplingParams(max_new_tokens=4)) for _ in range(2)])
    assert (a.cached_tokens, b.cached_tokens, engine.stats["prefix_cache_hits"]) == (0, 0, 0)
    assert a.tokens == b.tokens
    m.clear_kv_cache()


def test_best_of_n_samples_are_rows_of_one_batch(model):
    """self_chat.sample_answers (self-distillation's best-of-N): greedy, every row is the answer
    generate gives alone; sampled, the rows differ."""
    from lit_llama.templates import ChatFormat, get_template
    from lit_llama.align.self_chat import sample_answers

    m, tok = model
    fmt = ChatFormat(get_template("checkpoint", tok), tok)
    messages = [{"role": "user", "content": QUESTIONS[7]}]
    ids = fmt.prompt_ids(messages)
    alone = tok.decode(list(generate(m, torch.tensor(ids), 12, stop_ids=fmt.stop_ids))).strip()
    m.clear_kv_cache()
    answers, tokens = sample_answers(m, fmt, "cpu", messages, 3, max_new_tokens=12, temperature=0)
    assert answers == [alone] * 3 and tokens == 36
    torch.manual_seed(0)
    sampled, _ = sample_answers(m, fmt, "cpu", messages, 3, max_new_tokens=12, temperature=1.0, top_k=None)
    assert len(set(sampled)) == 3
