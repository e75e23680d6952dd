"""The Python API, for scripts and notebooks rather than the command line: load a checkpoint once,
then generate, stream or chat. The same loading and decoding as generate.py and chat.py.

    from lit_llama import LLM

    llm = LLM.load("checkpoints/SmolLM2-135M-Instruct")   # lora_path=, quantize="llm.int8", ...
    print(llm.generate("The capital of France is", max_new_tokens=20))
    for piece in llm.stream("Once upon a time", temperature=0.8, seed=1):
        print(piece, end="", flush=True)
    print(llm.chat("What is the capital of France?"))
    print(llm.chat([{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "What is the capital of France?"}]))
"""

from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch

from lit_llama.infer.chat import ChatSession
from lit_llama.infer.generation import check_sampling_args, compile_decode_step, decode_step, generate, stream_text
from lit_llama.infer.load import FinetunedArgs, load_for_inference
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.templates import ChatFormat, check_messages, choose_template

Messages = Union[str, Sequence[dict]]


class LLM:
    """A loaded model with its tokenizer, ready to generate. Make one with `LLM.load`.

    Sampling arguments, the same in every method: `max_new_tokens`; `temperature` (0: greedy, the
    default, so that a call is repeatable); `top_k` and `top_p` (nucleus) filtering; `seed` for the
    random draws (None: go on from the current random state); `stop`: strings that end the text
    (not included in it). Generation also ends at the tokenizer's end-of-text tokens."""

    def __init__(self, fabric, model, tokenizer, checkpoint_dir: Path, finetuned_path: Optional[Path] = None,
                 template: Optional[str] = None, compile: bool = False):
        self.fabric, self.model, self.tokenizer = fabric, model, tokenizer
        self.checkpoint_dir, self.compile = Path(checkpoint_dir), compile
        self._finetuned_path, self._template = finetuned_path, template
        self._format: Optional[ChatFormat] = None
        self._step = compile_decode_step(fabric.device) if compile else decode_step

    @classmethod
    def load(cls, checkpoint_dir: Union[str, Path] = DEFAULT_CHECKPOINT_DIR, *,
             lora_path: Optional[Union[str, Path]] = None, adapter_path: Optional[Union[str, Path]] = None,
             adapter_v2_path: Optional[Union[str, Path]] = None, finetuned_path: Optional[Union[str, Path]] = None,
             quantize: Optional[str] = None, precision: Optional[str] = None, template: Optional[str] = None,
             compile: bool = False, kv_cache_dtype: Optional[str] = None) -> "LLM":
        """Load a checkpoint directory (made by scripts/convert_*.py or `make model`).

        Args:
            checkpoint_dir: the base model; default the embedded SmolLM2-135M-Instruct.
            lora_path, adapter_path, adapter_v2_path, finetuned_path: finetuned weights on top (at
                most one), as the finetune/ scripts write them.
            quantize: "llm.int8" (quantized while loading), or "gptq.int4" / "gptq.int3" for a
                checkpoint written by quantize/gptq.py.
            precision: a Lightning Fabric precision ("32-true", "bf16-true", ...); default: the
                fastest exact one for the device.
            template: the chat template by name (see lit_llama/templates.py); default: the one
                recorded with the weights, else the checkpoint's own.
            compile: compile the decode step with torch.compile (slow first call, faster after).
            kv_cache_dtype: "fp32", "bf16", "fp16" or "int8" (a scale per head and position); default
                the model's dtype.
        """
        paths = {k: None if v is None else Path(v) for k, v in dict(
            lora_path=lora_path, adapter_path=adapter_path, adapter_v2_path=adapter_v2_path,
            finetuned_path=finetuned_path).items()}
        given = FinetunedArgs(**paths).given()
        fabric, model, tokenizer = load_for_inference(Path(checkpoint_dir), precision, quantize=quantize,
                                                      compile=compile, kv_cache_dtype=kv_cache_dtype, **paths)
        return cls(fabric, model, tokenizer, Path(checkpoint_dir), finetuned_path=given and given[1],
                   template=template, compile=compile)

    # ------------------------------------------------------------ plain text

    def stream(self, prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.0, top_k: Optional[int] = None,
               top_p: float = 1.0, seed: Optional[int] = None, stop: Sequence[str] = ()) -> Iterator[str]:
        """The continuation of `prompt`, in pieces as they are generated (BOS is added as the
        tokenizer does)."""
        return self._stream(self.tokenizer.encode(prompt).tolist(), self.tokenizer.stop_ids, stop, max_new_tokens,
                            temperature, top_k, top_p, seed)

    def generate(self, prompt: str, **sampling) -> str:
        """The continuation of `prompt` as one string; the arguments are those of `stream`."""
        return "".join(self.stream(prompt, **sampling))

    # ------------------------------------------------------------ chat

    @property
    def chat_format(self) -> ChatFormat:
        """The chat template bound to the tokenizer (chosen at the first chat call: a model without
        any template can still generate)."""
        if self._format is None:
            template, _ = choose_template(self.tokenizer, self.checkpoint_dir, self._template, self._finetuned_path)
            self._format = ChatFormat(template, self.tokenizer)
        return self._format

    def chat_stream(self, messages: Messages, *, system: Optional[str] = None, max_new_tokens: int = 512,
                    temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                    seed: Optional[int] = None, stop: Sequence[str] = ()) -> Iterator[str]:
        """The assistant's answer to `messages`, in pieces: a user message as a string, or a
        conversation [{"role": "system"|"user"|"assistant", "content": ...}, ...] (OpenAI's form).
        `system` puts a system message first."""
        messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        fmt = self.chat_format
        ids = fmt.prompt_ids(check_messages(messages))
        return self._stream(ids, fmt.stop_ids, [*fmt.stop_strings, *stop], max_new_tokens, temperature, top_k,
                            top_p, seed)

    def chat(self, messages: Messages, **sampling) -> str:
        """The assistant's answer as one string; the arguments are those of `chat_stream`."""
        return "".join(self.chat_stream(messages, **sampling))

    def session(self, system: Optional[str] = None, *, max_new_tokens: int = 512, temperature: float = 0.7,
                top_k: Optional[int] = 50, top_p: float = 1.0) -> ChatSession:
        """A multi-turn conversation that remembers its history (`respond(message)` streams each
        answer) and reuses the keys and values of the turns so far, as chat.py does."""
        return ChatSession(self.model, self.tokenizer, self.chat_format, self.fabric.device, system=system,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           compile=self.compile)

    # ------------------------------------------------------------ token ids

    def generate_ids(self, prompt: Union[str, Sequence[int]], *, max_new_tokens: int = 100, temperature: float = 0.0,
                     top_k: Optional[int] = None, top_p: float = 1.0, seed: Optional[int] = None) -> List[int]:
        """The generated token ids after `prompt` (text, encoded with BOS as the tokenizer does, or
        token ids), without the end-of-text token that ended them."""
        ids = self.tokenizer.encode(prompt).tolist() if isinstance(prompt, str) else [int(i) for i in prompt]
        return list(self._tokens(ids, self.tokenizer.stop_ids, max_new_tokens, temperature, top_k, top_p, seed))

    # ------------------------------------------------------------ the one decode path

    def _tokens(self, ids: List[int], stop_ids: Sequence[int], max_new_tokens: int, temperature: float,
                top_k: Optional[int], top_p: float, seed: Optional[int]) -> Iterator[int]:
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)  # at the call, not at the first token
        if seed is not None:
            self.fabric.seed_everything(seed, verbose=False)
        prompt = torch.tensor(ids, dtype=torch.long, device=self.fabric.device)
        return generate(self.model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_ids=stop_ids, step=self._step)

    def _stream(self, ids: List[int], stop_ids: Sequence[int], stop_strings: Sequence[str], max_new_tokens: int,
                temperature: float, top_k: Optional[int], top_p: float, seed: Optional[int]) -> Iterator[str]:
        tokens = self._tokens(ids, stop_ids, max_new_tokens, temperature, top_k, top_p, seed)
        return stream_text(self.tokenizer.decode, tokens, stop_strings)
