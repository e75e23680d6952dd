"""Direct Preference Optimization (Rafailov et al. 2023) with LoRA.

The policy is the base model plus LoRA; the reference is the same model with every LoRA branch
bypassed (`lora_disabled`), so no second copy of the weights is held. For a pair (x, y_c, y_r):

    loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])

where each log-probability is the sum over the answer's tokens only (the prompt is masked).
"""

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.data.instruction import IGNORE_INDEX
from lit_llama.peft.lora import lora_disabled
from lit_llama.align.preference import response_targets


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target) where the target is not IGNORE_INDEX: (B, T, V), (B, T) -> (B,)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(targets.shape).sum(-1)


def response_logprobs(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probabilities of each row's answer tokens, (2B,), for a collate_pairs batch."""
    inputs, targets = response_targets(batch)
    return sequence_logprobs(model(inputs), targets)


def reference_logprobs(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """`response_logprobs` of the reference: the same model with LoRA bypassed, without gradients."""
    with torch.no_grad(), lora_disabled(model):
        return response_logprobs(model, batch)


def dpo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Log-probs of 2B rows (the B chosen, then the B rejected) under the policy and the reference:
    (mean DPO loss, {"margin": mean beta * (chosen minus rejected log-ratio), "accuracy": fraction of
    pairs whose margin is positive, "chosen_reward"/"rejected_reward": mean beta * log-ratios})."""
    ratios = (policy_logps.float() - reference_logps.float().detach())
    chosen, rejected = ratios.chunk(2)
    margin = beta * (chosen - rejected)
    loss = -F.logsigmoid(margin).mean()
    return loss, {"margin": margin.mean().detach(), "accuracy": (margin > 0).float().mean(),
                  "chosen_reward": beta * chosen.mean().detach(), "rejected_reward": beta * rejected.mean().detach()}


def make_dpo_loss(beta: float = 0.1):
    """`compute_loss` for training.fit: the DPO loss of a collate_pairs batch (reference computed
    on the fly with LoRA bypassed)."""

    def compute_loss(model, batch):
        ref = reference_logprobs(model, batch)
        return dpo_loss(response_logprobs(model, batch), ref, beta)

    return compute_loss
