"""Prompt and chat templates, in one place so that finetuning, generation, chat and serving agree.

* The instruction template of finetuning (Stanford Alpaca), `instruction_prompt`.
* Chat templates: a conversation ([{"role": ..., "content": ...}]) becomes the prompt string.
  - "checkpoint": the Jinja `chat_template` stored with a checkpoint (Hugging Face
    `tokenizer_config.json` / `chat_template.jinja`, or GGUF metadata, which the GGUF converter copies
    into `tokenizer_config.json`), rendered in a sandbox the way transformers' `apply_chat_template`
    renders it;
  - built-ins: "chatml" (SmolLM2, Qwen, ...), "llama-2" (`[INST]`), "llama-3", "alpaca", "vicuna" (v1.1) and
    "baize" (`[|Human|]` / `[|AI|]`).
  Each template knows its stop strings (text that ends the answer) and stop tokens (special tokens
  that end a turn), and whether it writes BOS itself.
* Which template a checkpoint uses: `--template` if given, else a name recorded in
  `lit_template.json` (written by the converters and, for finetuned weights, next to the weights),
  else the checkpoint's own Jinja template.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lit_llama.utils import UserError

# ---------------------------------------------------------------- instruction template (finetuning)

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = ALPACA_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca template, with or without an input."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


TEMPLATES: Dict[str, Callable] = {"alpaca": alpaca}


def instruction_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[template](instruction, input)


# ---------------------------------------------------------------- Jinja, as transformers renders it

_jinja_cache: Dict[str, object] = {}


def _compile_jinja(source: str):
    """The template compiled in transformers' environment: an immutable sandbox (templates come from
    the Hub and are untrusted), trim_blocks/lstrip_blocks, loop controls, its `tojson` filter and the
    globals `raise_exception` and `strftime_now`."""
    if source in _jinja_cache:
        return _jinja_cache[source]
    from datetime import datetime

    import jinja2.ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(source)
    except TemplateError as e:
        raise UserError(f"the chat template cannot be parsed: {e}")
    if len(_jinja_cache) > 16:
        _jinja_cache.clear()
    _jinja_cache[source] = compiled
    return compiled


def render_jinja(source: str, messages: List[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """Render a Hugging Face chat template: `messages` plus `add_generation_prompt` and the special
    tokens (bos_token, eos_token, ...) and any other variables in `kwargs`, like transformers."""
    from jinja2.exceptions import TemplateError

    # messages whose values are None lose those keys, as in transformers (templates test for keys)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile_jinja(source).render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateError as e:
        raise UserError(f"the chat template refused the conversation: {e}")


# ---------------------------------------------------------------- chat templates

ROLES = ("system", "user", "assistant")


def check_messages(messages: Sequence[dict]) -> List[dict]:
    """[{"role", "content"}] with known roles and string contents, or a UserError saying what is wrong."""
    if not messages:
        raise UserError("the conversation is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must have a string 'role' and a string 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _split_system(messages: List[dict], default: Optional[str]) -> Tuple[Optional[str], List[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


@dataclass
class ChatTemplate:
    """A conversation format. `render(messages)` gives the prompt text; `stop_strings` end an answer
    wherever they appear in the generated text; `stop_tokens` are special tokens (by their text) that
    end a turn; `adds_bos`: the text starts with the BOS token itself, so encoding must not add one."""

    name: str
    stop_strings: Tuple[str, ...] = ()
    stop_tokens: Tuple[str, ...] = ()
    default_system: Optional[str] = None
    adds_bos: bool = False
    description: str = ""

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, bos_token: str = "",
               eos_token: str = "") -> str:
        return self._render(check_messages(messages), add_generation_prompt, bos_token, eos_token)

    def _render(self, messages: List[dict], add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
        raise NotImplementedError


class ChatML(ChatTemplate):
    def _render(self, messages, add_generation_prompt, bos_token, eos_token):
        system, rest = _split_system(messages, self.default_system)
        turns = ([{"role": "system", "content": system}] if system is not None else []) + rest
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class Llama2(ChatTemplate):
    """Meta's Llama-2-chat format: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`,
    one `<s>[INST] ... [/INST]` per user turn (what Meta's reference code and its published Hugging Face
    chat template produce; contents are stripped)."""

    def _render(self, messages, add_generation_prompt, bos_token, eos_token):
        system, rest = _split_system(messages, self.default_system)
        out = []
        for i, m in enumerate(rest):
            if (m["role"] == "user") != (i % 2 == 0):
                raise UserError("the llama-2 template needs alternating user/assistant messages after the system one")
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            if m["role"] == "user":
                out.append(f"{bos_token}[INST] {content.strip()} [/INST]")
            else:
                out.append(f" {content.strip()} {eos_token}")
        return "".join(out)


class Llama3(ChatTemplate):
    """Meta's Llama 3 Instruct format: `<|begin_of_text|>` once, then per message
    `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>` (contents stripped), and the
    assistant's header to answer after (Meta's reference code and Llama 3's Hugging Face template)."""

    def _render(self, messages, add_generation_prompt, bos_token, eos_token):
        system, rest = _split_system(messages, self.default_system)
        turns = ([{"role": "system", "content": system}] if system is not None else []) + rest
        out = bos_token + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                                  for m in turns)
        return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


class Alpaca(ChatTemplate):
    """Stanford Alpaca's instruction format (what finetune/ trains on), one `### Instruction:` /
    `### Response:` pair per turn; an answer ends with EOS, as in the training data. A single turn
    renders exactly `instruction_prompt(instruction)`; a system message replaces the header line."""

    def _render(self, messages, add_generation_prompt, bos_token, eos_token):
        system, rest = _split_system(messages, self.default_system)
        out = system + "\n\n"
        for m in rest:
            if m["role"] == "user":
                out += f"### Instruction:\n{m['content']}\n\n### Response:\n"
            elif m["role"] == "assistant":
                out += f"{m['content']}{eos_token}\n\n"
        return out


class Vicuna(ChatTemplate):
    """Vicuna v1.1 (FastChat's `vicuna_v1.1`): `{system} USER: {user} ASSISTANT: {answer}</s>USER: ...`."""

    def _render(self, messages, add_generation_prompt, bos_token, eos_token):
        system, rest = _split_system(messages, self.default_system)
        out = system + " "
        for m in rest:
            if m["role"] == "user":
                out += f"USER: {m['content']} "
            elif m["role"] == "assistant":
                out += f"ASSISTANT: {m['content']}{eos_token}"
        if add_generation_prompt:
            out += "ASSISTANT:"
        return out


class Baize(ChatTemplate):
    """Baize (FastChat's `baize`): the system text, an example exchange, then `[|Human|]{user}\\n[|AI|]{answer}\\n`."""

    def _render(self, messages, add_generation_prompt, bos_token, eos_token):
        system, rest = _split_system(messages, self.default_system)
        out = system if system.endswith("\n") else system + "\n"
        out += "[|Human|]Hello!\n[|AI|]Hi!\n"
        for m in rest:
            tag = "[|Human|]" if m["role"] == "user" else "[|AI|]"
            if m["role"] != "system":
                out += f"{tag}{m['content']}\n"
        if add_generation_prompt:
            out += "[|AI|]"
        return out


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
BAIZE_SYSTEM = (
    "The following is a conversation between a human and an AI assistant named Baize (named after a mythical "
    "creature in Chinese folklore). Baize is an open-source AI assistant developed by UCSD and Sun Yat-Sen "
    "University. The human and the AI assistant take turns chatting. Human statements start with [|Human|] and "
    "AI assistant statements start with [|AI|]. The AI assistant always provides responses in as much detail as "
    "possible, and in Markdown format. The AI assistant always declines to engage with topics, questions and "
    "instructions related to unethical, controversial, or sensitive issues. Complete the transcript in exactly "
    "that format.\n")

BUILTIN: Dict[str, ChatTemplate] = {t.name: t for t in [
    ChatML("chatml", stop_strings=("<|im_end|>", "<|im_start|>"), stop_tokens=("<|im_end|>",),
           description="<|im_start|>role ... <|im_end|> (SmolLM2, Qwen, OpenHermes)"),
    Llama2("llama-2", stop_strings=("[INST]",), adds_bos=True, description="Llama-2-chat's <s>[INST] ... [/INST]"),
    Llama3("llama-3", stop_strings=("<|start_header_id|>",), stop_tokens=("<|eot_id|>", "<|eom_id|>"), adds_bos=True,
           description="Llama 3 Instruct's <|start_header_id|>role<|end_header_id|> ... <|eot_id|>"),
    Alpaca("alpaca", stop_strings=("### Instruction:", "### Response:"), default_system=ALPACA_HEADER,
           description="Stanford Alpaca's ### Instruction / ### Response (what finetune/ trains on)"),
    Vicuna("vicuna", stop_strings=("USER:",), default_system=VICUNA_SYSTEM, description="Vicuna v1.1's USER: / ASSISTANT:"),
    Baize("baize", stop_strings=("[|Human|]", "[|AI|]"), default_system=BAIZE_SYSTEM,
          description="Baize's [|Human|] / [|AI|]"),
]}
CHECKPOINT = "checkpoint"  # the name that selects the checkpoint's own Jinja template

# special tokens that end a turn in the common Jinja templates; those in the vocabulary stop generation
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                "</s>", "<|END_OF_TURN_TOKEN|>", "<|eom_id|>")


class JinjaChatTemplate(ChatTemplate):
    """A checkpoint's own Hugging Face chat template, rendered like transformers (which encodes the
    result without adding special tokens: the template writes BOS itself where it wants one)."""

    def __init__(self, source: str, name: str = CHECKPOINT, **kwargs):
        stops = tuple(t for t in _END_OF_TURN if t in source)
        super().__init__(name=name, stop_tokens=stops, adds_bos=True,
                         description="the checkpoint's own Jinja chat template")
        self.source = source
        self.variables = kwargs  # other special tokens (unk_token, pad_token) the template may read

    def render(self, messages, add_generation_prompt=True, bos_token="", eos_token=""):
        return render_jinja(self.source, check_messages(messages), add_generation_prompt,
                            **{**self.variables, "bos_token": bos_token, "eos_token": eos_token})


def template_names() -> List[str]:
    return [CHECKPOINT, *BUILTIN]


def get_template(name: str, tokenizer=None) -> ChatTemplate:
    """A built-in template by name, or "checkpoint" for the tokenizer's own Jinja template."""
    if name == CHECKPOINT:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("this checkpoint has no chat template of its own; choose one of "
                            + ", ".join(BUILTIN))
        return JinjaChatTemplate(tokenizer.chat_template, **tokenizer.template_variables())
    if name not in BUILTIN:
        raise UserError(f"unknown chat template {name!r}; choose one of {', '.join(template_names())}")
    return BUILTIN[name]


# ---------------------------------------------------------------- which template a checkpoint uses

TEMPLATE_FILE = "lit_template.json"


def check_template_name(name: str) -> None:
    if name != CHECKPOINT and name not in BUILTIN:
        raise UserError(f"unknown chat template {name!r}; choose one of {', '.join(template_names())}")


def save_template_name(directory: Path, name: str) -> None:
    """Record the chat template a checkpoint (or finetuned weights) is to be used with."""
    check_template_name(name)
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / TEMPLATE_FILE).write_text(json.dumps({"template": name}) + "\n")


def recorded_template_name(path: Optional[Path]) -> Optional[str]:
    """The name in `path`/lit_template.json (`path` a directory, or a weights file beside it)."""
    if path is None:
        return None
    path = Path(path)
    f = (path if path.is_dir() else path.parent) / TEMPLATE_FILE
    if not f.is_file():
        return None
    try:
        name = json.loads(f.read_text()).get("template")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{f} is not valid JSON of the form {{\"template\": NAME}}")
    if not isinstance(name, str):
        raise UserError(f"{f} names no template")
    return name


def choose_template(tokenizer, checkpoint_dir: Path, name: Optional[str] = None,
                    finetuned_path: Optional[Path] = None) -> Tuple[ChatTemplate, str]:
    """(template, where the choice came from). Order: `name` (--template); the name recorded with the
    finetuned weights; for finetuned weights without a record, alpaca (finetune/'s data format); the
    name recorded in the checkpoint directory; the checkpoint's own Jinja template."""
    if name:
        return get_template(name, tokenizer), "--template"
    if finetuned_path is not None:
        recorded = recorded_template_name(finetuned_path)
        if recorded:
            return get_template(recorded, tokenizer), f"recorded with {finetuned_path}"
        return BUILTIN["alpaca"], f"{finetuned_path} records no template; finetune/ trains on alpaca"
    recorded = recorded_template_name(checkpoint_dir)
    if recorded:
        return get_template(recorded, tokenizer), f"recorded in {Path(checkpoint_dir) / TEMPLATE_FILE}"
    if getattr(tokenizer, "chat_template", None):
        return get_template(CHECKPOINT, tokenizer), "the checkpoint's tokenizer config"
    raise UserError(f"{checkpoint_dir} has no chat template; choose one with --template "
                    f"({', '.join(BUILTIN)})")


# ---------------------------------------------------------------- a conversation as token ids


class ChatFormat:
    """A template bound to a tokenizer: the prompt ids of a conversation and the ids/strings that end
    an answer."""

    def __init__(self, template: ChatTemplate, tokenizer):
        self.template = template
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = tokenizer.special_token_text("bos"), tokenizer.special_token_text("eos")
        stop_ids = set(tokenizer.stop_ids)
        for t in template.stop_tokens:
            i = tokenizer.token_to_id(t)
            if i is not None:
                stop_ids.add(i)
        self.stop_ids: List[int] = sorted(stop_ids)
        # a stop string that is one special token is handled by its id already
        self.stop_strings: List[str] = list(template.stop_strings)
        specials = {s for s in [self.bos_token, self.eos_token, tokenizer.special_token_text("unk"),
                                *template.stop_tokens, *_chat_specials(template)] if s}
        self.special_ids = {s: tokenizer.token_to_id(s) for s in specials}
        self.special_ids = {s: i for s, i in self.special_ids.items() if i is not None}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special_ids, key=len, reverse=True))) + ")") \
            if self.special_ids else None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token)

    def encode(self, text: str) -> List[int]:
        """Token ids of a rendered conversation: special tokens written in the text (BOS, EOS,
        <|im_start|>, ...) become their ids whichever the tokenizer backend (a SentencePiece model
        would spell "<s>" out letter by letter), as transformers' tokenizers do; BOS is added in
        front only where the template does not write it and the tokenizer adds one by default."""
        tok = self.tokenizer
        ids = [tok.bos_id] if not self.template.adds_bos and tok.add_bos and tok.bos_id is not None else []
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(tok.encode(part, bos=False).tolist())
        return ids

    def prompt_ids(self, messages: Sequence[dict]) -> List[int]:
        return self.encode(self.render(messages))


def _chat_specials(template: ChatTemplate) -> Tuple[str, ...]:
    return ("<|im_start|>", "<|im_end|>") if isinstance(template, ChatML) else ()
