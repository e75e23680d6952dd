"""One Tokenizer over SentencePiece `tokenizer.model` or Hugging Face `tokenizer.json`.

BOS/EOS ids, whether BOS is prepended, and the chat template come from the checkpoint's
`tokenizer_config.json` / `generation_config.json` when present, else from the tokenizer itself."""

import json
from pathlib import Path
from typing import List, Optional

import torch

from lit_llama.templates import render_jinja
from lit_llama.utils import UserError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON")


def _token_text(tok) -> Optional[str]:
    # tokenizer_config.json stores special tokens as a string or as {"content": ...}
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, checkpoint_dir: Path) -> None:
        d = Path(checkpoint_dir)
        cfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.processor = HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{d / 'tokenizer.json'} cannot be read: {e}")
            self.backend = "huggingface"
        elif (d / "tokenizer.model").is_file():
            import sentencepiece as spm

            try:
                self.processor = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            except Exception as e:
                raise UserError(f"{d / 'tokenizer.model'} cannot be read: {e}")
            self.backend = "sentencepiece"
        else:
            raise UserError(f"no tokenizer.json or tokenizer.model in {d}")
        self.bos_id = self._special_id(cfg.get("bos_token"), gen.get("bos_token_id"), "bos")
        self.eos_id = self._special_id(cfg.get("eos_token"), gen.get("eos_token_id"), "eos")
        # generation stops at any of these: Llama-3-style configs list several end-of-turn ids
        extra = gen.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [extra]
        self.stop_ids = sorted({i for i in [self.eos_id, *extra] if i is not None})
        self.add_bos = cfg["add_bos_token"] if "add_bos_token" in cfg else self._adds_bos_by_default()
        # the special tokens' text, as the config names them (what a chat template sees)
        self._special_text = {k: _token_text(cfg.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad")}
        self.chat_template: Optional[str] = _chat_template(d, cfg)

    def special_token_text(self, kind: str) -> str:
        """The text of the "bos", "eos", "unk" or "pad" token ("" if there is none)."""
        text = self._special_text.get(kind)
        if isinstance(text, str):
            return text
        i = {"bos": self.bos_id, "eos": self.eos_id}.get(kind)
        if i is None:
            return ""
        if self.backend == "huggingface":
            return self.processor.id_to_token(i) or ""
        return self.processor.id_to_piece(i)

    def template_variables(self) -> dict:
        """The special tokens transformers passes to a chat template (bos_token, eos_token, ...)."""
        return {f"{k}_token": self.special_token_text(k) for k in ("bos", "eos", "unk", "pad")
                if self.special_token_text(k)}

    def _special_id(self, token, gen_id, kind: str) -> Optional[int]:
        text = _token_text(token)
        if text is not None:
            i = self.token_to_id(text)
            if i is not None:
                return i
        if isinstance(gen_id, int):
            return gen_id
        if isinstance(gen_id, list) and gen_id:
            return gen_id[0]
        if self.backend == "sentencepiece":
            i = self.processor.bos_id() if kind == "bos" else self.processor.eos_id()
            return i if i >= 0 else None
        return None

    def _adds_bos_by_default(self) -> bool:
        if self.bos_id is None:
            return False
        if self.backend == "sentencepiece":
            return True  # LLaMA's convention
        ids = self.processor.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def token_to_id(self, token: str) -> Optional[int]:
        if self.backend == "huggingface":
            return self.processor.token_to_id(token)
        i = self.processor.piece_to_id(token)
        return None if i == self.processor.unk_id() and token != self.processor.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        if self.backend == "huggingface":
            return self.processor.get_vocab_size(with_added_tokens=True)
        return self.processor.vocab_size()

    def vocabulary(self) -> List[str]:
        """Every token's text, by id: two tokenizers with equal vocabularies encode alike."""
        if self.backend == "huggingface":
            vocab = self.processor.get_vocab(with_added_tokens=True)
            pieces = [""] * (max(vocab.values()) + 1)
            for piece, i in vocab.items():
                pieces[i] = piece
            return pieces
        return [self.processor.id_to_piece(i) for i in range(self.processor.vocab_size())]

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> torch.Tensor:
        if self.backend == "huggingface":
            ids = self.processor.encode(text, add_special_tokens=False).ids
        else:
            ids = self.processor.encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=False)
        return self.processor.decode(ids)

    def apply_chat_template(self, messages: List[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the checkpoint's Jinja chat
        template, in a sandbox, with the same options and globals as transformers."""
        if not self.chat_template:
            raise UserError("this checkpoint has no chat template")
        return render_jinja(self.chat_template, messages, add_generation_prompt,
                            **{**self.template_variables(), **kwargs})


def _chat_template(d: Path, cfg: dict) -> Optional[str]:
    """The checkpoint's chat template: `chat_template.jinja` (what recent transformers saves) or the
    `chat_template` of tokenizer_config.json, a string or a list of named templates ("default" used)."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None
