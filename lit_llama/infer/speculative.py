"""Speculative decoding: a cheap drafter guesses the next few tokens of each sequence, the model checks
them all in one forward pass, and every guess it agrees with is a token gained (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023).

Two drafters: prompt lookup (Saxena 2023), which copies what followed the latest earlier occurrence
of the sequence's last n-gram (free, and good when the answer repeats its input: summaries, code
edits, quoting), and a smaller draft model with the same tokenizer.

Both propose their tokens deterministically (the draft model greedily), so the rule that keeps the
output distribution the model's own is the one for a point-mass draft: a drafted token d is accepted
with probability p(d), and at the first rejection the token is drawn from p with d removed
(renormalized). Greedy decoding accepts while the drafted token is the argmax: the output is the
plain greedy one (up to float rounding of a multi-token pass, tested token for token).

The engine (lit_llama/infer/engine.py) asks the drafter for each decoding row's guesses, verifies all rows
in one batched pass and calls `swap` when it exchanges rows, so that a draft model's own KV cache
rows follow the engine's.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from lit_llama.infer.generation import row_forward, sample_probs
from lit_llama.infer.load import load_for_inference
from lit_llama.model import LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError


class PromptLookup:
    """Draft tokens from the sequence itself: the tokens that followed the most recent earlier
    occurrence of its last n tokens (n from max_ngram down to min_ngram). A single token recurs too
    often to predict what follows: with min_ngram 1, free generation drafted 426 tokens in 200 and
    5% were accepted, 15% slower than no drafts; with 2 it breaks even, and copying is as fast
    (benchmarks/speculative.py)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def attach(self, n_rows: int, capacity: int, device) -> None:
        pass

    def swap(self, a: int, b: int) -> None:
        pass

    def propose(self, contexts: Sequence[Sequence[int]], limits: Sequence[int]) -> List[List[int]]:
        return [lookup(ctx, k, self.max_ngram, self.min_ngram) if k > 0 else [] for ctx, k in zip(contexts, limits)]


def lookup(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> List[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    tokens = list(tokens)
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        tail = tokens[L - n:]
        for i in range(L - n - 1, -1, -1):  # latest first; the tail itself (i = L - n) excluded
            if tokens[i: i + n] == tail:
                return tokens[i + n: i + n + k]
    return []


class DraftModel:
    """A smaller model with the same tokenizer proposes its greedy continuation. It keeps its own KV
    cache with one row per engine row; `tokens[row]` are the tokens whose keys and values that row
    holds, so after the model rejects some guesses the draft recomputes only what changed."""

    def __init__(self, model: LLaMA):
        self.model = model
        self.tokens: List[List[int]] = []

    def attach(self, n_rows: int, capacity: int, device) -> None:
        self.model.set_kv_cache(n_rows, capacity, device)
        self.caches = [block.attn.kv_cache for block in self.model.transformer.h]
        self.tokens = [[] for _ in range(n_rows)]
        self.capacity, self.device = capacity, torch.device(device)

    def swap(self, a: int, b: int) -> None:
        n = max(len(self.tokens[a]), len(self.tokens[b]))
        if a != b and n:
            for cache in self.caches:
                for buf in (cache.k, cache.v):
                    buf[[a, b], :, :n] = buf[[b, a], :, :n]
        self.tokens[a], self.tokens[b] = self.tokens[b], self.tokens[a]

    @torch.inference_mode()
    def propose(self, contexts: Sequence[Sequence[int]], limits: Sequence[int]) -> List[List[int]]:
        """Row i of the cache continues contexts[i] by up to limits[i] greedy tokens."""
        D = len(contexts)
        k = max(limits, default=0)
        if k == 0:
            return [[] for _ in contexts]
        # catch up: each row computes the tokens of its context it does not hold yet (after a
        # rejection, or a new prompt), and gives its first guess
        first = []
        for i, ctx in enumerate(contexts):
            held = self.tokens[i]
            n = 0
            while n < min(len(held), len(ctx) - 1) and held[n] == ctx[n]:
                n += 1
            first.append(self._extend(i, list(ctx[n:]), n))
            self.tokens[i] = list(ctx)
        drafts = [[t] for t in first]
        # the rest of the guesses, one batched step per token for all rows
        for _ in range(k - 1):
            tokens = torch.tensor([[d[-1]] for d in drafts], device=self.device)
            pos = torch.tensor([[len(self.tokens[i])] for i in range(D)], device=self.device)
            L = min(self.capacity, int(pos.max()) + 1)
            mask = (torch.arange(L, device=self.device)[None, :] <= pos)[:, None, None, :]
            x = self.model.hidden_states(tokens, pos, mask=mask)
            nxt = self.model.logits(x)[:, -1].argmax(-1).tolist()
            for i in range(D):
                self.tokens[i].append(drafts[i][-1])
                drafts[i].append(nxt[i])
        return [d[:lim] for d, lim in zip(drafts, limits)]

    def _extend(self, row: int, chunk: List[int], p0: int) -> int:
        """Write `chunk` at positions p0.. of `row`; the greedy next token."""
        x = row_forward(self.model, row, chunk, p0, self.device)
        return int(self.model.logits(x[:, -1:])[0, -1].argmax())


def accept(draft: Sequence[int], logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: float,
           generator: Optional[torch.Generator] = None) -> Tuple[List[int], int]:
    """(accepted draft tokens, the next token) from the model's logits (len(draft) + 1, V) at the
    positions before each drafted token and after the last one."""
    if temperature <= 0:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        return list(draft[:n]), best[n]
    probs = sample_probs(logits, temperature, top_k, top_p)
    u = torch.rand(len(draft), generator=generator, device=logits.device).tolist() if draft else []
    for n, d in enumerate(draft):
        if u[n] >= float(probs[n, d]):  # rejected: draw from p without d
            residual = probs[n].clone()
            residual[d] = 0
            return list(draft[:n]), _draw(residual, generator)
    return list(draft), _draw(probs[len(draft)], generator)


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    # the exponential race of generation.sample: needs no normalization
    return int((probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax())


@dataclass
class SpeculativeArgs:
    """Speculative decoding (the output is the same as without it).

    Args:
        prompt_lookup: speculative decoding with drafts copied from the prompt and the text so far
            (what followed the last few tokens' latest earlier occurrence): fast when the answer
            repeats its input.
        draft_checkpoint_dir: speculative decoding with this smaller model's greedy guesses; it must
            have the same tokenizer.
        draft_tokens: the most tokens drafted per step.
    """

    prompt_lookup: bool = False
    draft_checkpoint_dir: Optional[Path] = None
    draft_tokens: int = 5

    def check(self) -> "SpeculativeArgs":
        check_draft_tokens(self.draft_tokens)
        return self

    def drafter(self, tokenizer, fabric, precision: Optional[str] = None):
        """The drafter these flags ask for (None: no speculation); see load_drafter."""
        return load_drafter(self.prompt_lookup, self.draft_checkpoint_dir, tokenizer, fabric, precision)


def check_draft_tokens(draft_tokens: int) -> None:
    if draft_tokens < 1:
        raise UserError(f"--draft_tokens must be at least 1, got {draft_tokens}")


def load_drafter(prompt_lookup: bool, draft_checkpoint_dir: Optional[Path], tokenizer, fabric,
                 precision: Optional[str] = None):
    """The drafter the flags ask for (None: no speculation). A draft model must share the model's
    tokenizer: the same vocabulary, token for token."""
    if prompt_lookup and draft_checkpoint_dir is not None:
        raise UserError("choose one drafter: --prompt_lookup or --draft_checkpoint_dir")
    if prompt_lookup:
        return PromptLookup()
    if draft_checkpoint_dir is None:
        return None
    draft_tokenizer = Tokenizer(draft_checkpoint_dir)
    if draft_tokenizer.vocabulary() != tokenizer.vocabulary():
        raise UserError(f"the draft model in {draft_checkpoint_dir} has another tokenizer than the model "
                        f"(vocabularies of {draft_tokenizer.vocab_size} and {tokenizer.vocab_size} tokens differ): "
                        f"a draft model must share the model's tokenizer")
    _, model, _ = load_for_inference(draft_checkpoint_dir, precision)
    return DraftModel(model.to(fabric.device))

