"""Multi-turn chat: a session that keeps the history, renders it with the chat template, trims the
oldest turns to fit the context, and streams the answer with the template's stop strings applied,
through the batched engine (whose prefix cache keeps the conversation's keys and values between
turns). Loading the model and its template: lit_llama/infer/load.py (load_chat_model)."""

import signal
import sys
import threading
from typing import Iterator, List, Optional, TextIO, Tuple

from lit_llama.infer.engine import Engine, Request, SamplingParams, stream
from lit_llama.templates import ChatFormat, get_template
from lit_llama.utils import UserError


DEFAULT_CONTEXT = 8192


class ChatSession:
    """One conversation with a model: `respond(message)` streams the answer and remembers the turn.

    The answers run on the batched engine with one row: after a turn its row keeps the keys and
    values of the conversation so far, so the next turn's prompt, which starts with them, prefills
    only its new tokens (the engine's prefix cache). When old turns are left out to fit the context
    the prompt starts differently and is computed again in full."""

    def __init__(self, model, tokenizer, fmt: ChatFormat, device, *, system: Optional[str] = None,
                 max_new_tokens: int = 512, temperature: float = 0.7, top_k: Optional[int] = 50, top_p: float = 1.0,
                 max_seq_length: Optional[int] = None, compile: bool = False, drafter=None, draft_tokens: int = 5):
        self.model, self.tokenizer, self.fmt, self.device = model, tokenizer, fmt, device
        self.system = system or None
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        # by default at most DEFAULT_CONTEXT: the cache is allocated whole, and Llama 3.1's 131072
        # positions would take 8.6 GB at 1B parameters in float32
        self.context = min(model.config.block_size, max_seq_length or DEFAULT_CONTEXT)
        self.compile = compile
        self.drafter, self.draft_tokens = drafter, draft_tokens  # speculative decoding (lit_llama/infer/speculative.py)
        self._engine: Optional[Engine] = None  # made at the first answer
        self.history: List[dict] = []  # user and assistant messages, oldest first
        self.dropped = 0  # turns dropped from the history to fit the context, in total

    def reset(self) -> None:
        self.history = []

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=1, cache_rows=1,
                                  max_seq_length=self.context, compile=self.compile, device=self.device,
                                  drafter=self.drafter, draft_tokens=self.draft_tokens)
        return self._engine

    def messages(self, history: List[dict], message: str) -> List[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + history + [{"role": "user", "content": message}]

    def prompt(self, message: str) -> Tuple[List[int], List[dict]]:
        """(prompt ids, the history they include) for `message` after the history.

        The prompt leaves room for the answer: max_new_tokens, or half the context if that is less.
        Whole turns (a user message and its answer) are left out, oldest first, until it fits; the
        system message stays. A message that does not fit on its own is a UserError."""
        reserve = min(self.max_new_tokens, self.context // 2)
        history = list(self.history)
        while True:
            ids = self.fmt.prompt_ids(self.messages(history, message))
            if len(ids) + reserve <= self.context or not history:
                break
            # drop the oldest turn: up to the next user message
            history = history[next((i for i in range(1, len(history)) if history[i]["role"] == "user"), len(history)):]
        if len(ids) >= self.context:
            raise UserError(f"the message is too long: the prompt has {len(ids)} tokens and the context is "
                            f"{self.context}")
        return ids, history

    def respond(self, message: str) -> Iterator[str]:
        """Stream the answer to `message`. The turn is kept in the history even when the answer is cut
        short (Ctrl-C: what was shown is what the model said)."""
        ids, history = self.prompt(message)
        dropped = sum(m["role"] == "user" for m in self.history) - sum(m["role"] == "user" for m in history)
        if dropped:
            self.history = history
            self.dropped += dropped
            self.on_trim(dropped)
        max_new = min(self.max_new_tokens, self.context - len(ids))
        params = SamplingParams(max_new_tokens=max_new, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                stop_ids=tuple(self.fmt.stop_ids), stop_strings=tuple(self.fmt.stop_strings))
        request = Request(ids, params)
        try:
            yield from stream(self.engine, request)
        finally:
            self.last_request = request
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": request.text}]

    def on_trim(self, dropped: int) -> None:
        """Called when old turns are dropped to fit the context (the CLI says so on stderr)."""


HELP = "/reset clears the history, /system TEXT sets the system message, /template NAME switches the template, " \
       "/exit leaves; Ctrl-C stops an answer"


def run_chat(session: ChatSession, tokenizer, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> None:
    """The read-answer loop of chat.py. A terminal gets a `>> ` prompt; from a pipe, each message is
    echoed as `>> message` so that the output reads as a transcript. Ctrl-C during an answer stops
    that answer; at the prompt it only reminds how to leave; end of input or /exit leaves."""
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C is how an answer is stopped: a process started in the background inherits SIGINT
        # ignored (POSIX shells do that), and Python then keeps it ignored; take it back
        signal.signal(signal.SIGINT, signal.default_int_handler)
    tty = inp.isatty()
    if tty:
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
    session.on_trim = lambda n: print(f"(the context is full: left out the oldest {n} turn{'s' * (n > 1)})",
                                      file=err, flush=True)
    while True:
        try:
            if tty and inp is sys.stdin:
                line = input(">> ")
            else:
                line = inp.readline()
                if not line:
                    break
                line = line.rstrip("\n")
                print(f">> {line}", file=out, flush=True)
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops an answer; /exit or Ctrl-D leaves)", file=err, flush=True)
            continue
        except EOFError:
            break
        message = line.strip()
        if not message:
            print("(empty message: type something to send, or /exit)", file=err, flush=True)
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            session.reset()
            print("(history cleared)", file=err, flush=True)
            continue
        if message.startswith("/system"):
            session.system = message[len("/system"):].strip() or None
            print(f"(system message {'set' if session.system else 'cleared'})", file=err, flush=True)
            continue
        if message.startswith("/template"):
            name = message[len("/template"):].strip()
            try:
                session.fmt = ChatFormat(get_template(name, tokenizer), tokenizer)
                print(f"(template: {name})", file=err, flush=True)
            except UserError as e:
                print(f"error: {e}", file=err, flush=True)
            continue
        if message.startswith("/") and message.split()[0] in ("/help", "/?"):
            print(HELP, file=err, flush=True)
            continue
        answer = session.respond(message)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
            out.write("\n")
        except KeyboardInterrupt:
            answer.close()  # keeps the partial answer in the history
            out.write("\n")
            print("(stopped)", file=err, flush=True)
        except UserError as e:
            print(f"error: {e}", file=err, flush=True)
        out.flush()
