"""Prompt templates, in one place so that finetuning, generation and chat agree on them."""

from typing import Dict

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca template, with or without an input."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


TEMPLATES: Dict[str, callable] = {"alpaca": alpaca}


def instruction_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[template](instruction, input)
