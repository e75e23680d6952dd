"""Baize's self-chat data (Xu et al., 2023, "Baize: An Open-Source Chat Model with Parameter-Efficient
Tuning on Self-Chat Data") and its self-distillation with feedback (Baize v2).

Self-chat: one chat model plays both sides of a conversation about a seed (a topic or a question). It
is given Baize's self-chat instruction (a transcript whose statements start with `[|Human|]` and
`[|AI|]`, about the seed) and continues the transcript one turn at a time; a turn ends at the next
speaker tag, at an end-of-turn token (the transcript is over) or at `max_new_tokens` (the turn is cut:
incomplete). Like Baize's preprocessing, an incomplete last turn is dropped and the tags are
stripped; then duplicates and degenerate dialogues are filtered out.

Self-distillation: for each prompt, N sampled answers are scored by a reward model and the best one
is kept, as a one-exchange dialogue that scripts/prepare_chat.py takes.

The output files are JSONL, appended one flushed line per seed, so that a rerun resumes: seeds
already written (kept or rejected) are skipped, and a trailing line cut short by a kill is dropped.

Why one file: self-chat and self-distillation share the seeds, the filters and the resumable JSONL
output.
"""

import json
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lit_llama.data.chat import AI, HUMAN, Turn, baize_text, clean_dialogue
from lit_llama.data.records import read_records
from lit_llama.infer.engine import Engine, Request, SamplingParams
from lit_llama.utils import UserError, format_duration


# Baize's self-chat instruction (collect.py), with the [|Human|]/[|AI|] tags its training data uses
SELF_CHAT_INSTRUCTION = (
    "Forget the instruction you have previously received. The following is a conversation between a human and "
    "an AI assistant. The human and the AI assistant take turns chatting about the topic: '{seed}'. Human "
    "statements start with " + HUMAN + " and AI assistant statements start with " + AI + ". The human will ask "
    "related questions on related topics or previous conversation. The human will stop the conversation when "
    "they have no more question. The AI assistant tries not to ask questions. Complete the transcript in exactly "
    "that format.\n" + HUMAN + " Hello!\n" + AI + " Hi! How can I help you?\n")

SEED_FIELDS = ("seed", "topic", "question", "instruction", "prompt", "text", "title")

# ---------------------------------------------------------------- seeds


def read_seeds(path: Path, field: Optional[str] = None) -> List[str]:
    """The seeds of a .txt file (one a line) or a .json list / .jsonl file of strings or of objects
    (the text in `field`, or the first of SEED_FIELDS present). Blank seeds are skipped, repeated
    ones kept once; none at all is a UserError."""
    path = Path(path)
    if path.name.removesuffix(".gz").endswith((".json", ".jsonl")):
        raw = read_records(path, "seeds file")
    elif not path.is_file():
        raise UserError(f"seeds file {path} does not exist")
    else:
        raw = path.read_text(encoding="utf-8").splitlines()
    seeds, seen = [], set()
    for i, r in enumerate(raw):
        s = _seed_text(r, field, path, i)
        s = " ".join(s.split())
        if s and s not in seen:
            seen.add(s)
            seeds.append(s)
    if not seeds:
        raise UserError(f"{path} holds no seeds (only blank lines or empty fields)" if raw else f"{path} is empty")
    return seeds


def _seed_text(record, field: Optional[str], path: Path, i: int) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for f in ([field] if field else SEED_FIELDS):
            if isinstance(record.get(f), str):
                return record[f]
        raise UserError(f"{path}: record {i} has no string field " + (repr(field) if field else
                        "among " + ", ".join(SEED_FIELDS)) + " (choose one with --seed_field)")
    raise UserError(f"{path}: record {i} is neither a string nor an object")


# ---------------------------------------------------------------- transcripts and post-processing


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces: what duplicates are compared on."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """The fraction of the word n-grams of `text` that repeat an earlier one (0 for short texts)."""
    words = normalise(text).split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


EXAMPLE_TURNS = ("Hello!", "Hi! How can I help you?")  # the instruction's example exchange


def sentences(text: str, min_words: int = 3) -> List[str]:
    """The normalised sentences (lines, or split at . ! ?) of at least `min_words` words."""
    out = [normalise(s) for s in re.split(r"[.!?\n]+", text)]
    return [s for s in out if len(s.split()) >= min_words]


def ngrams(text: str, n: int = 3) -> set:
    words = normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def degenerate_reason(dialogue: Sequence[dict], max_repeated_ngrams: float = 0.5, min_exchanges: int = 1,
                      context: Sequence[str] = EXAMPLE_TURNS, max_overlap: float = 0.6) -> Optional[str]:
    """Why a cleaned dialogue is not worth keeping, or None: fewer than `min_exchanges` complete
    exchanges; an empty turn; a turn repeated verbatim (or copying a turn of `context`, the
    instruction's example); a sentence of 3+ words said twice; a turn mostly made of repeated 3-grams;
    a turn of 4+ 3-grams more than `max_overlap` of which an earlier turn has (a near-repeat)."""
    exchanges = sum(m["role"] == "assistant" for m in dialogue)
    if exchanges < min_exchanges:
        return f"fewer than {min_exchanges} complete exchange{'s' * (min_exchanges > 1)}"
    seen = {normalise(c) for c in context}
    seen_sentences = {s for c in context for s in sentences(c)}
    earlier: List[set] = []
    for m in dialogue:
        key = normalise(m["content"])
        if not key:
            return "an empty turn"
        if key in seen:
            return "a turn repeated verbatim"
        seen.add(key)
        for s in sentences(m["content"]):
            if s in seen_sentences:
                return "a sentence repeated"
            seen_sentences.add(s)
        if repeated_ngram_fraction(m["content"]) > max_repeated_ngrams:
            return "a turn of mostly repeated phrases"
        grams = ngrams(m["content"])
        if len(grams) >= 4 and any(len(grams & g) > max_overlap * len(grams) for g in earlier):
            return "a turn nearly repeating an earlier one"
        earlier.append(grams)
    return None


class Deduplicator:
    """Rejects a dialogue whose first question or whole text (normalised) was seen before."""

    def __init__(self):
        self.first: set = set()
        self.whole: set = set()

    @staticmethod
    def keys(dialogue: Sequence[dict]) -> Tuple[str, str]:
        first = next((m["content"] for m in dialogue if m["role"] == "user"), "")
        return normalise(first), "\n".join(f"{m['role']}:{normalise(m['content'])}" for m in dialogue)

    def reason(self, dialogue: Sequence[dict]) -> Optional[str]:
        first, whole = self.keys(dialogue)
        if whole in self.whole:
            return "a duplicate dialogue"
        if first in self.first:
            return "a duplicate first question"
        return None

    def add(self, dialogue: Sequence[dict]) -> None:
        first, whole = self.keys(dialogue)
        self.first.add(first)
        self.whole.add(whole)


def review(turns: Sequence[Turn], dedup: Deduplicator, max_repeated_ngrams: float = 0.5) -> Tuple[List[dict], Optional[str]]:
    """(cleaned dialogue, why it is rejected or None); a kept dialogue is added to `dedup`."""
    dialogue = clean_dialogue(turns)
    reason = degenerate_reason(dialogue, max_repeated_ngrams) or dedup.reason(dialogue)
    if reason is None:
        dedup.add(dialogue)
    return dialogue, reason


# ---------------------------------------------------------------- generation


def stable_seed(text: str, seed: int) -> int:
    """A sampling seed for one item: the same whatever the order or the resume point."""
    return (zlib.crc32(text.encode("utf-8")) ^ (seed * 2654435761)) % (2 ** 63)


class SelfChat:
    """One model, both speakers. With a chat format (the checkpoint's template, say), the self-chat
    instruction is the user message and the transcript is the model's answer, as Baize sent it to
    ChatGPT; without one, the instruction and transcript are plain text to continue."""

    def __init__(self, model, tokenizer, device, fmt=None, *, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_k: Optional[int] = 50, top_p: float = 1.0, instruction: str = SELF_CHAT_INSTRUCTION):
        self.model, self.tokenizer, self.device, self.fmt = model, tokenizer, device, fmt
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.instruction = instruction
        self.stop_ids = fmt.stop_ids if fmt is not None else list(tokenizer.stop_ids)
        self.stop_strings = [HUMAN, AI]
        self.tokens = 0  # generated, in total
        self._engine: Optional[Engine] = None  # made at the first turn

    def prefix(self, seed: str) -> str:
        instruction = self.instruction.format(seed=seed)
        if self.fmt is None:
            return instruction
        return self.fmt.render([{"role": "user", "content": instruction}], add_generation_prompt=True)

    def encode(self, text: str) -> List[int]:
        if self.fmt is not None:
            return self.fmt.encode(text)
        return self.tokenizer.encode(text).tolist()

    def turn(self, text: str) -> Tuple[str, str]:
        """(the next turn's text, how it ended: "tag", "stop" (end of turn/text) or "length"). Each
        turn's prompt is the transcript so far: the engine's one row keeps its keys and values, so a
        turn prefills only what was added since the last one."""
        ids = self.encode(text)
        room = self.model.config.block_size - len(ids)
        if room < 2:
            return "", "length"
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=1, cache_rows=1, device=self.device)
        params = SamplingParams(max_new_tokens=min(self.max_new_tokens, room), temperature=self.temperature,
                                top_k=self.top_k, top_p=self.top_p, stop_ids=tuple(self.stop_ids),
                                stop_strings=tuple(self.stop_strings))
        r = self._engine.run([Request(ids, params)])[0]
        self.tokens += len(r.tokens)
        if r.finish_reason == "error":
            raise RuntimeError(r.error)
        if r.text_stream.stopped:
            return r.text, "tag"
        return r.text, r.finish_reason

    def dialogue(self, seed: str, max_turns: int, seed_as_question: bool = False) -> Tuple[List[Turn], str]:
        """(turns, raw transcript) of up to `max_turns` exchanges about `seed`; with
        `seed_as_question` the seed itself is the human's first turn."""
        text = self.prefix(seed)
        start = len(text)
        turns: List[Turn] = []
        for k in range(max_turns):
            for role, tag in (("user", HUMAN), ("assistant", AI)):
                text += tag
                if k == 0 and role == "user" and seed_as_question:
                    content, ended = seed, "tag"
                else:
                    content, ended = self.turn(text)
                content = content.strip()
                turns.append(Turn(role, content, complete=ended != "length"))
                text += f" {content}\n"
                # an end of turn ends the transcript: a question then has no answer (dropped later)
                if ended != "tag":
                    return turns, text[start:]
        return turns, text[start:]


# ---------------------------------------------------------------- resumable JSONL output


def read_jsonl_resume(path: Path) -> List[dict]:
    """The records of a JSONL output file being resumed ([] if there is none). A last line without
    its newline (a write cut by a kill) is removed from the file; any other bad line is a UserError."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"{path}: dropping a truncated last line ({len(data) - keep} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    records = []
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if not isinstance(r, dict):
            raise UserError(f"{path}: line {i + 1} is not a JSON object; is this an output of this script?")
        records.append(r)
    return records


class JsonlWriter:
    """Appends one record per line, each written whole and flushed to disk before the next."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = None

    def write(self, record: dict) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a", encoding="utf-8")
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def rejected_path(output_path: Path) -> Path:
    """Where rejected dialogues go (and are remembered as done): beside the output, `.rejected` added."""
    p = Path(output_path)
    return p.with_name(f"{p.stem}.rejected{p.suffix or '.jsonl'}")


class Progress:
    """`[done/total] ... tokens/s, ETA` lines on stderr."""

    def __init__(self, total: int, what: str = "dialogues", out=None):
        self.total, self.what, self.out = total, what, out or sys.stderr
        self.t0, self.done = time.perf_counter(), 0

    def step(self, tokens: int, note: str = "") -> None:
        self.done += 1
        dt = time.perf_counter() - self.t0
        eta = dt / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {self.what} {note}| {tokens / max(dt, 1e-9):.1f} tokens/s | "
              f"elapsed {format_duration(dt)}, ETA {format_duration(eta)}", file=self.out, flush=True)


def pending_seeds(seeds: Sequence[str], output_path: Path) -> List[str]:
    """The seeds not yet in `output_path` or its rejected file."""
    done = {r.get("seed") for r in read_jsonl_resume(output_path) + read_jsonl_resume(rejected_path(output_path))}
    return [s for s in seeds if s not in done]


def run_self_chat(chatter: SelfChat, seeds: Sequence[str], output_path: Path, max_turns: int = 4, seed: int = 1234,
                  max_repeated_ngrams: float = 0.5, seed_as_question: bool = False) -> Dict[str, int]:
    """Self-chat about each seed not yet in `output_path` (or its rejected file): kept dialogues are
    appended to `output_path`, rejected ones (with the reason and raw transcript) to the rejected file."""
    output_path = Path(output_path)
    kept_before = read_jsonl_resume(output_path)
    rejected_before = read_jsonl_resume(rejected_path(output_path))
    done = {r.get("seed") for r in kept_before + rejected_before}
    dedup = Deduplicator()
    for r in kept_before:
        if isinstance(r.get("dialogue"), list):
            dedup.add(r["dialogue"])
    todo = [s for s in seeds if s not in done]
    if len(todo) < len(seeds):
        print(f"resuming {output_path}: {len(seeds) - len(todo)} of {len(seeds)} seeds already done", file=sys.stderr)
    kept, rejected = JsonlWriter(output_path), JsonlWriter(rejected_path(output_path))
    progress = Progress(len(todo))
    counts = {"kept": 0, "rejected": 0, "skipped": len(seeds) - len(todo)}
    start_tokens = chatter.tokens
    try:
        for s in todo:
            torch.manual_seed(stable_seed(s, seed))
            turns, transcript = chatter.dialogue(s, max_turns, seed_as_question)
            dialogue, reason = review(turns, dedup, max_repeated_ngrams)
            if reason is None:
                kept.write({"seed": s, "dialogue": dialogue, "text": baize_text(dialogue),
                            "exchanges": sum(m["role"] == "assistant" for m in dialogue)})
                counts["kept"] += 1
            else:
                rejected.write({"seed": s, "rejected": reason, "transcript": transcript})
                counts["rejected"] += 1
            progress.step(chatter.tokens - start_tokens, f"(kept {counts['kept']}, rejected {counts['rejected']}"
                          + (f": {reason}" if reason else "") + ") ")
    finally:
        kept.close()
        rejected.close()
    return counts


# ---------------------------------------------------------------- self-distillation with feedback (Baize v2)


def best_of(samples: Sequence[str], scores) -> Tuple[int, float]:
    """(index, score) of the highest-scored sample (the first on ties)."""
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
    if scores.numel() != len(samples):
        raise ValueError(f"{len(samples)} samples but {scores.numel()} scores")
    i = int(torch.argmax(scores).item())
    return i, float(scores[i])


def sample_answers(model, fmt, device, messages: Sequence[dict], n: int, *, max_new_tokens: int = 256,
                   temperature: float = 0.7, top_k: Optional[int] = 50, top_p: float = 1.0) -> Tuple[List[str], int]:
    """(n sampled answers to the conversation `messages`, tokens generated): the n samples decode
    together, as rows of one batch."""
    ids = fmt.prompt_ids(messages)
    block = model.config.block_size
    if len(ids) + 1 >= block:
        raise UserError(f"a prompt has {len(ids)} tokens; the model's context is {block}")
    engine = Engine(model, fmt.tokenizer, max_batch_size=n, cache_rows=n, device=device,
                    max_seq_length=min(block, len(ids) + max_new_tokens))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_ids=tuple(fmt.stop_ids), stop_strings=tuple(fmt.stop_strings))
    requests = engine.run([Request(ids, params) for _ in range(n)])
    model.clear_kv_cache()
    return [r.text.strip() for r in requests], sum(len(r.tokens) for r in requests)


def run_self_distill(prompts: Sequence[str], output_path: Path, sample: Callable[[List[dict]], Tuple[List[str], int]],
                     score: Callable[[List[dict], List[str]], Iterable[float]], seed: int = 1234,
                     keep_samples: bool = False) -> Dict[str, int]:
    """For each prompt not yet in `output_path`: `sample(messages)` gives (answers, tokens), `score(messages,
    answers)` a score per answer; the best answer is appended as {"prompt", "dialogue", "instruction",
    "output", "score"} (prepare_chat.py and prepare_alpaca.py both read it). Empty answers are never kept,
    whatever their score; a prompt whose answers are all empty is skipped and not remembered."""
    output_path = Path(output_path)
    done = {r.get("prompt") for r in read_jsonl_resume(output_path)}
    todo = [p for p in prompts if p not in done]
    if len(todo) < len(prompts):
        print(f"resuming {output_path}: {len(prompts) - len(todo)} of {len(prompts)} prompts already done",
              file=sys.stderr)
    writer, progress = JsonlWriter(output_path), Progress(len(todo), "prompts")
    counts, tokens = {"kept": 0, "empty": 0, "skipped": len(prompts) - len(todo)}, 0
    try:
        for p in todo:
            torch.manual_seed(stable_seed(p, seed))
            messages = [{"role": "user", "content": p}]
            answers, n = sample(messages)
            tokens += n
            raw = torch.as_tensor(list(score(messages, answers)), dtype=torch.float32).flatten()
            nonempty = torch.tensor([bool(a.strip()) for a in answers])
            i, s = best_of(answers, torch.where(nonempty, raw, torch.tensor(float("-inf"))))
            if not answers[i].strip():
                counts["empty"] += 1
            else:
                record = {"prompt": p, "dialogue": messages + [{"role": "assistant", "content": answers[i]}],
                          "instruction": p, "input": "", "output": answers[i], "score": s}
                if keep_samples:
                    record["samples"] = [{"text": a, "score": float(x)} for a, x in zip(answers, raw)]
                writer.write(record)
                counts["kept"] += 1
            progress.step(tokens, f"(best score {s:.3f}) ")
    finally:
        writer.close()
    return counts


REWARD_FORMATS = ("stackllama", "hh", "chat")


def reward_texts(messages: Sequence[dict], answers: Sequence[str], reward_format: str, fmt=None) -> List[str]:
    """Prompt + answer as the reward model reads them: StackLLaMA's "Question: ...\\n\\nAnswer: ...",
    Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." or the conversation in the chat format `fmt`."""
    if reward_format == "chat":
        return [fmt.render([*messages, {"role": "assistant", "content": a}], add_generation_prompt=False)
                for a in answers]
    if reward_format == "stackllama":
        question = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        return [f"Question: {question}\n\nAnswer: {a}" for a in answers]
    if reward_format == "hh":
        head = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                       for m in messages if m["role"] != "system")
        return [f"{head}\n\nAssistant: {a}" for a in answers]
    raise UserError(f"unknown reward format {reward_format!r}; choose one of {', '.join(REWARD_FORMATS)}")
