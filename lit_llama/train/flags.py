"""Flag groups that several training scripts take, declared once: run_cli makes a dataclass
parameter's fields flags of their own (TrainArgs, in train/loop.py, is the other such group)."""

from dataclasses import dataclass

from lit_llama.peft.lora import LoRAConfig
from lit_llama.utils import UserError


@dataclass
class LoRAArgs:
    """Which matrices LoRA adapts and how (the flags of finetune/lora.py, dpo.py, reward_model.py, ppo.py).

    Args:
        lora_r: rank of the low-rank update.
        lora_alpha: the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA branch's input (off while sampling and scoring).
        lora_query: adapt the query projection.
        lora_key: adapt the key projection.
        lora_value: adapt the value projection.
        lora_projection: adapt the attention output projection.
        lora_mlp: adapt the three MLP matrices.
    """

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_query: bool = True
    lora_key: bool = False
    lora_value: bool = True
    lora_projection: bool = False
    lora_mlp: bool = False

    def config(self) -> LoRAConfig:
        """The LoRAConfig these flags describe; adapting nothing, or a rank below 1, is an error."""
        if self.lora_r < 1:
            raise UserError(f"--lora_r must be at least 1, got {self.lora_r}")
        if not (self.lora_query or self.lora_key or self.lora_value or self.lora_projection or self.lora_mlp):
            raise UserError("LoRA adapts nothing: enable at least one of --lora_query, --lora_key, --lora_value, "
                            "--lora_projection, --lora_mlp")
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, query=self.lora_query,
                          key=self.lora_key, value=self.lora_value, projection=self.lora_projection, mlp=self.lora_mlp)
