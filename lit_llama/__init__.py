"""lit_llama: a hackable LLaMA toolkit. `from lit_llama import LLM` is the Python API
(lit_llama/api.py); `python -m lit_llama` runs the scripts (lit_llama/__main__.py)."""


def __getattr__(name):
    # the API loads torch, Lightning and the tokenizers: only when it is asked for, so that
    # `import lit_llama.model` stays the model's imports alone
    if name == "LLM":
        from lit_llama.api import LLM

        return LLM
    raise AttributeError(f"module 'lit_llama' has no attribute {name!r}")
