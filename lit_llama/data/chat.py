"""Multi-turn chat data for finetuning: dialogues rendered with a chat template, tokenised, with the
loss on the assistant's turns only.

Each assistant turn is trained with the marker that ends it at inference: the template's end-of-turn
token (`<|im_end|>` of ChatML, EOS of Alpaca/Vicuna/Llama-2) or, for templates without one (Baize), the
tag that starts the next turn (`[|Human|]`, appended after the last answer, as Baize's own data does).
Everything else (system text, user turns, role headers, the template's preamble) gets IGNORE_INDEX.

The prepared folder (lit_llama/data/records.py's format; meta.json adds the template's name) is what
lit_llama.data.instruction.load_instruction_data reads, so finetune/*.py train on it unchanged and
record the template for chat.py. Baize's transcripts ([|Human|] ... [|AI|] ...) are parsed here too.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from lit_llama.data.instruction import IGNORE_INDEX
from lit_llama.data.records import check_val_fraction, read_records, save_prepared, shuffled, tokenizer_fingerprint, val_size
from lit_llama.templates import ChatFormat, get_template
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system"}

# ---------------------------------------------------------------- Baize's transcripts

HUMAN, AI = "[|Human|]", "[|AI|]"  # Baize's speaker tags (lit_llama.templates' "baize" template stops at them)


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    content: str
    complete: bool = True  # False: cut at max_new_tokens (or the transcript ended mid-turn)


_TAG_RE = re.compile(r"\[\|?\s*(?:Human|AI)\s*\|?\]", re.IGNORECASE)


def strip_tags(text: str) -> str:
    """The text without speaker tags ([|Human|], [|AI|], and collect.py's [Human]/[AI]) or a tag's
    unfinished beginning at the end, whitespace-trimmed."""
    text = _TAG_RE.sub(" ", text)
    for tag in (HUMAN, AI, "[Human]", "[AI]"):  # "... [|Hu" left by a cut
        for k in range(len(tag) - 1, 1, -1):
            if text.rstrip().endswith(tag[:k]):
                text = text.rstrip()[: -k]
                break
    return re.sub(r"[ \t]+", " ", text).strip()


def parse_transcript(text: str, complete: bool = False) -> List[Turn]:
    """Turns of a transcript `[|Human|] ... [|AI|] ...` (collect.py's [Human]/[AI] too); text before
    the first tag is ignored. Unless `complete`, the last turn may have been cut and is marked
    incomplete (as Baize's preprocessing, which drops it)."""
    parts = re.split(r"(\[\|?\s*(?:Human|AI)\s*\|?\])", text, flags=re.IGNORECASE)
    turns = []
    for tag, content in zip(parts[1::2], parts[2::2]):
        role = "user" if "human" in tag.lower() else "assistant"
        turns.append(Turn(role, content.strip()))
    if turns and not complete:
        turns[-1].complete = False
    return turns


def clean_dialogue(turns: Sequence[Turn]) -> List[dict]:
    """[{"role", "content"}]: up to the first incomplete turn, tags stripped, consecutive turns of one
    speaker merged (the model wrote its tag twice), ending with an answer (a last question without
    one is dropped)."""
    out: List[dict] = []
    for t in turns:
        if not t.complete:
            break
        content = strip_tags(t.content)
        if out and out[-1]["role"] == t.role:
            out[-1]["content"] = (out[-1]["content"] + "\n" + content).strip()
        else:
            out.append({"role": t.role, "content": content})
    while out and out[0]["role"] != "user":
        out.pop(0)
    while out and out[-1]["role"] != "assistant":
        out.pop()
    return out


def baize_text(dialogue: Sequence[dict]) -> str:
    """The dialogue in the Baize chat format (lit_llama.templates' "baize" template: what
    `prepare_chat.py --template baize` trains on and `chat.py --template baize` prompts with)."""
    return get_template("baize").render(dialogue, add_generation_prompt=False)


# ---------------------------------------------------------------- reading and checking dialogues


def read_dialogues(path: Path) -> List[List[dict]]:
    """The dialogues of a JSON list or JSONL file. A record is one of: {"dialogue": [...]} (self_chat.py,
    self_distill.py) or {"messages": [...]} with {"role", "content"} messages; ShareGPT's
    {"conversations": [{"from", "value"}]}; Alpaca's {"instruction", "input"?, "output"} (one
    exchange); Baize's released data {"input": "... [|Human|] ... [|AI|] ..."}."""
    raw = read_records(path)
    if not raw:
        raise UserError(f"{path} holds no records")
    return [to_dialogue(r, f"{path}: record {i}") for i, r in enumerate(raw)]


def to_dialogue(record, where: str) -> List[dict]:
    """One record as a checked [{"role", "content"}] dialogue (see read_dialogues for the formats)."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object")
    for key in ("dialogue", "messages"):
        if key in record:
            return check_dialogue(record[key], where)
    if "conversations" in record:
        conv = record["conversations"]
        if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
            raise UserError(f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} objects")
        messages = []
        for j, m in enumerate(conv):
            role = SHAREGPT_ROLES.get(str(m.get("from", "")).lower())
            if role is None:
                raise UserError(f"{where}: message {j} is from {m.get('from')!r}; use human, gpt or system")
            messages.append({"role": role, "content": m.get("value")})
        return check_dialogue(messages, where)
    if "instruction" in record and "output" in record:
        user = str(record["instruction"])
        if record.get("input"):
            user += "\n\n" + str(record["input"])
        return check_dialogue([{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}],
                              where)
    if isinstance(record.get("input"), str) and "[|AI|]" in record["input"]:
        return check_dialogue(clean_dialogue(parse_transcript(record["input"], complete=True)), where)
    raise UserError(f"{where} has none of the fields dialogue, messages, conversations, instruction+output, "
                    f"or a Baize transcript in input")


def check_dialogue(messages, where: str) -> List[dict]:
    """An optional system message, then user and assistant messages alternating, from the user first to
    an assistant answer last, each with non-empty text; else a UserError saying which message is wrong."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: the dialogue must be a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {j} must have a string 'role' and a string 'content'")
        if not m["content"].strip():
            raise UserError(f"{where}: message {j} ({m['role']}) is empty")
        out.append({"role": m["role"], "content": m["content"]})
    body = out[1:] if out[0]["role"] == "system" else out
    offset = len(out) - len(body)
    for j, m in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise UserError(f"{where}: message {j + offset} has role {m['role']!r} where {expected!r} was expected "
                            f"(an optional system message, then user and assistant turns alternating)")
    if not body:
        raise UserError(f"{where}: the dialogue has no user message")
    if body[-1]["role"] != "assistant":
        raise UserError(f"{where}: the dialogue must end with an assistant message")
    return out


# ---------------------------------------------------------------- rendering and masking


def assistant_spans(fmt, messages: Sequence[dict]) -> Tuple[str, List[Tuple[int, int]]]:
    """(the rendered dialogue, the [start, end) character span of each assistant turn, end marker
    included). A turn starts where the template's prompt for it ends (the conversation up to it with
    the generation prompt: what the model sees at inference) and ends after its end-of-turn token, or
    else after the next stop string (the next speaker's tag; appended after the last turn)."""
    messages = list(messages)
    full = fmt.render(messages, add_generation_prompt=False)
    stop_texts = [t for t in (*fmt.template.stop_tokens, fmt.eos_token) if t]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = fmt.render(messages[:i], add_generation_prompt=True)
        upto = fmt.render(messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise UserError(f"the {fmt.template.name} template does not render a conversation as the prompt of "
                            f"each answer followed by the answer; choose another --template")
        start, end = len(prompt), len(upto)
        hits = [p + len(t) for t in stop_texts for p in [full.find(t, start, end)] if p >= 0]
        if hits:
            end = min(hits)
        else:  # no end-of-turn token: the answer ends with the next speaker's tag
            marker = next(iter(fmt.template.stop_strings), None)
            if marker is None:
                marker = fmt.eos_token
            if not marker:
                raise UserError(f"the {fmt.template.name} template has no end-of-turn marker to train on")
            nxt = full.find(marker, end) if fmt.template.stop_strings else -1
            if nxt < 0 or full[end:nxt].strip():
                if i != len(messages) - 1:
                    raise UserError(f"the {fmt.template.name} template does not start the next turn with {marker!r}")
                nxt = len(full)
                full += marker
            end = nxt + len(marker)
        spans.append((start, end))
    return full, spans


def encode_dialogue(fmt, messages: Sequence[dict], max_seq_length: int) -> Optional[Dict[str, torch.Tensor]]:
    """{"input_ids", "labels"}: the rendered dialogue, labels IGNORE_INDEX but on the assistant spans.
    Pieces are encoded one by one (BOS only in front), so a token never straddles a span boundary. A
    dialogue longer than max_seq_length keeps its leading exchanges that fit (or, if the first does
    not, its first max_seq_length tokens); None if no trained token would be left."""
    full, spans = assistant_spans(fmt, messages)
    bos = fmt.encode("")  # what encode() puts in front of any text: [BOS] or []
    ids: List[int] = []
    labels: List[int] = []
    ends: List[int] = []
    pos = 0
    for start, end in [*spans, (len(full), len(full))]:
        for text, trained in ((full[pos:start], False), (full[start:end], True)):
            if not text:
                continue
            piece = fmt.encode(text)
            piece = piece[len(bos):] if ids else piece
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if end > start:
            ends.append(len(ids))
        pos = end
    if len(ids) > max_seq_length:
        fit = [e for e in ends if e <= max_seq_length]
        cut = fit[-1] if fit else max_seq_length
        ids, labels = ids[:cut], labels[:cut]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # the first label is never a target
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


# ---------------------------------------------------------------- the prepared folder


def prepare_chat_data(dialogues: Sequence[List[dict]], checkpoint_dir: Path, destination: Path, template: str = "baize",
                      max_seq_length: int = 512, val_fraction: float = 0.04, seed: int = 42) -> dict:
    """Tokenise `dialogues` with `template` and write train.pt, val.pt and meta.json to `destination`
    (atomically: nothing is written on an error). Returns the metadata."""
    check_val_fraction(val_fraction)
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    fmt = ChatFormat(get_template(template, tokenizer), tokenizer)
    dialogues = shuffled(dialogues, seed)
    encoded = [encode_dialogue(fmt, d, max_seq_length) for d in tqdm(dialogues, desc="tokenizing", unit="dialogue")]
    skipped = sum(e is None for e in encoded)
    encoded = [e for e in encoded if e is not None]
    if not encoded:
        raise UserError(f"no dialogue has an answer within --max_seq_length {max_seq_length} tokens")
    n_val = val_size(len(encoded), val_fraction)
    trained = sum(int((e["labels"] != IGNORE_INDEX).sum()) for e in encoded)
    meta = save_prepared(destination, encoded, n_val, {
        "tokenizer": tokenizer_fingerprint(checkpoint_dir), "max_seq_length": max_seq_length, "mask_inputs": True,
        "template": template, "format": "chat", "n_skipped": skipped,
        "tokens": sum(len(e["input_ids"]) for e in encoded), "trained_tokens": trained})
    note = f" ({skipped} skipped: no answer within {max_seq_length} tokens)" if skipped else ""
    print(f"wrote {meta['n_train']} training and {n_val} validation dialogues to {destination}{note}; "
          f"{trained} of {meta['tokens']} tokens are trained (the assistant's)")
    return meta
