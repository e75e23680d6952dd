from setuptools import find_packages, setup

setup(
    name="lit_llama",
    version="0.1.0",
    description="A hackable, single-file implementation of LLaMA-family models on Lightning Fabric",
    license="Apache-2.0",
    packages=find_packages(include=["lit_llama", "lit_llama.*"]),
    python_requires=">=3.9",
    # torch is not pinned here: `make` installs the CPU wheel on CPU machines first; a GPU user's
    # plain `pip install -e .` gets PyPI's default (CUDA) build
    install_requires=[
        "torch>=2.5",
        "lightning>=2.2",
        "jsonargparse[signatures]>=4.27",
        "sentencepiece",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "gguf>=0.10",
        "bitsandbytes>=0.50",  # QLoRA's 4-bit layers; 0.50 has CPU kernels too
        "numpy",
        "tqdm",
        "jinja2",
        "protobuf",
        "huggingface_hub",
        "tensorboard",  # pretraining's TensorBoard logs (through Fabric's logger)
        "fastapi>=0.110",  # serve.py: the OpenAI-compatible HTTP API
        "uvicorn>=0.29",
        "ninja",  # builds the CPU decoding kernels on first use (lit_llama/cpu_kernels.py)
    ],
    # serve.py's web chat page; the CPU decode attention kernel's source, built on first use
    package_data={"lit_llama.serve": ["static/*.html"], "lit_llama": ["csrc/*.cpp"]},
    # `lit-llama generate --prompt ...`: the scripts by name (lit_llama/__main__.py), as `python -m lit_llama`
    entry_points={"console_scripts": ["lit-llama = lit_llama.__main__:main"]},
    extras_require={
        # openai: the official client against serve.py; fschat: FastChat's conversation templates, the
        # reference for the built-in chat templates; websocket-client: drives headless Chromium (test_web.py)
        # tiktoken: the reference for Llama 3's tokenizer (test_llama3.py); scipy: the chi-square test of speculative sampling; triton: its interpreter checks the GPTQ kernel on CPU. The llama.cpp peer (llama-cpp-python)
        # is not listed: PyPI has only its source, whose native build crashes on AMX CPUs;
        # scripts/install_llama_cpp.sh (run by `make install`) builds one that runs on every CPU
        "test": ["pytest", "pytest-rerunfailures", "transformers>=4.45", "accelerate", "peft", "openai>=1.0", "fschat==0.2.36",
                 "websocket-client", "tiktoken", "scipy", "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # evaluate/harness.py (EleutherAI's lm-eval) and the standard perplexity sets of evaluate/*.py
        "eval": ["lm_eval>=0.4", "datasets"],
        # benchmarks/serve_load.py runs llama-cpp-python's server (llama_cpp.server) beside serve.py: its extras
        "bench": ["sse-starlette", "starlette-context", "pydantic-settings"],
    },
)
