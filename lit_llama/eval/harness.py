"""EleutherAI's lm-evaluation-harness (`lm_eval`) on any lit_llama checkpoint, without converting it.

The harness asks a model three things; this adapter answers them with our model and tokenizer:
  loglikelihood          log P(continuation | context) and whether greedy decoding would produce it
                         (multiple-choice tasks such as those of the LLaMA paper's Table 3)
  loglikelihood_rolling  log P(text) over windows of the context length (perplexity tasks)
  generate_until         greedy generation until a stop string (generative tasks)

    python evaluate/harness.py --checkpoint_dir D --tasks hellaswag,piqa
    lm_eval --model lit_llama --model_args checkpoint_dir=D ...  (after `import lit_llama.eval.harness`)
"""

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_llama.infer.engine import Engine, Request, SamplingParams
from lit_llama.infer.load import load_for_inference
from lit_llama.utils import UserError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the `eval` extra is not installed
    raise UserError(f"the lm-eval harness is not installed ({e}): pip install -e '.[eval]'")


@register_model("lit_llama")
class LitLLaMALM(TemplateLM):
    """One request at a time (batch 1): simple, and the model's forward pass is the cost anyway."""

    def __init__(self, checkpoint_dir: str = "checkpoints/SmolLM2-135M-Instruct", quantize: Optional[str] = None,
                 precision: Optional[str] = None, max_length: Optional[int] = None, max_gen_toks: int = 256,
                 wrap: Optional[Callable] = None, **kwargs):
        super().__init__()
        self.fabric, self.model, self.tokenizer = load_for_inference(Path(checkpoint_dir), precision, wrap, quantize)
        block_size = self.model.config.block_size
        self.max_length = min(int(max_length or block_size), block_size)
        self.max_gen_toks = int(max_gen_toks)
        self._engine = None  # made at the first generate_until

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # what an empty context is conditioned on: BOS where the tokenizer has one
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def device(self):
        return self.fabric.device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tokenizer.encode(string, bos=add_special_tokens).tolist()

    def tok_decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def _score(self, context: List[int], continuation: List[int]) -> Tuple[float, bool]:
        """log P(continuation | context) from one forward pass over the last max_length tokens."""
        tokens = (context + continuation)[-(self.max_length + 1):]
        inputs = torch.tensor(tokens[:-1], device=self.device)[None]
        n = min(len(continuation), inputs.size(1))
        logprobs = F.log_softmax(self.model(inputs)[0, -n:].float(), dim=-1)
        target = torch.tensor(continuation[-n:], device=self.device)
        ll = logprobs.gather(-1, target[:, None]).sum().item()
        return ll, bool((logprobs.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        out = []
        for key, context, continuation in requests:
            result = self._score(context, continuation)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            windows = get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            ll = sum(self._score(*make_disjoint_window(w))[0] for w in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            out.append(ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """All requests as rows of one batch on the engine (lit_llama/infer/engine.py), each with its own
        stop strings (`until`) and length."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=8, max_seq_length=self.max_length,
                                  cache_rows=8, device=self.device)
        batch = []
        for context, gen_kwargs in [r.args for r in requests]:
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            # keep room for the answer inside the context
            max_new = min(max_new, self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                    stop_ids=tuple(self.tokenizer.stop_ids), stop_strings=tuple(until))
            batch.append(Request(ids, params))
        # the engine's queue is bounded: submit in slices
        for i in range(0, len(batch), self._engine.max_waiting):
            self._engine.run(batch[i:i + self._engine.max_waiting])
        out = []
        for (context, gen_kwargs), r in zip([r.args for r in requests], batch):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), r.text)
            out.append(r.text)
        return out


def load_tasks(tasks: List[str], include_path: Optional[str] = None):
    """A TaskManager that knows `tasks` (names or YAML tasks under `include_path`), their data loaded
    (downloaded the first time, then cached): every problem with them shows before a model loads."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)} (`lm_eval ls tasks` lists them)")
    try:
        manager.load(tasks)
    except Exception as e:  # the hub unreachable, a dataset gone: any reason means no data here
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the data of {', '.join(tasks)} ({reason})")
    return manager


def run_tasks(lm: LitLLaMALM, tasks: List[str], manager, num_fewshot: Optional[int] = None,
              limit: Optional[int] = None) -> dict:
    """The harness's results dict for `tasks` (checked and loaded by load_tasks)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager)
