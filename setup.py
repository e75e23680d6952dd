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
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.45", "accelerate", "peft"],
    },
)
