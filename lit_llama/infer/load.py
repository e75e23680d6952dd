"""Loading a checkpoint for inference, in one place: the model (float, quantized while loading, or
packed by quantize/gptq.py), optional finetuned weights (LoRA, adapter, adapter v2 or full), the
tokenizer and the Fabric that runs them. The flag groups every inference script shares for it
(FinetunedArgs, LoadArgs) are declared here too."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from lit_llama import cpu_kernels
from lit_llama.infer.generation import decode_layout
from lit_llama.io.checkpoint import (LOWBIT_METHODS, available_memory, build_model, load_finetuned_weights, load_safetensors, load_weights_file,
                                     read_checkpoint_config, read_quantization, validate_checkpoint_dir, weight_files)
from lit_llama.peft.adapter import ADAPTER_FILE, load_adapter
from lit_llama.peft.adapter_v2 import ADAPTER_V2_FILE, load_adapter_v2
from lit_llama.peft.lora import load_lora
from lit_llama.quant.bnb import quantize_linears
from lit_llama.quant.packed import build_packed_model
from lit_llama.quant.quantization import check_quantize_mode
from lit_llama.quant.weight_only import (MODES as WEIGHT_ONLY_MODES, build_lowbit_model, quantize_weight_only,
                                        use_int4_kernels)
from lit_llama.templates import ChatFormat, choose_template
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, default_precision, make_fabric


@dataclass
class FinetunedArgs:
    """Finetuned weights added to the checkpoint (at most one of them).

    Args:
        lora_path: LoRA weights from finetune/lora.py (its --out_dir or the lit_lora.safetensors file).
        adapter_path: adapter weights from finetune/adapter.py or adapter_v2.py (folder or file; which
            of the two, the file says).
        adapter_v2_path: adapter v2 weights from finetune/adapter_v2.py (folder or file).
        finetuned_path: finetune/full.py's weights: its --out_dir, its final/ checkpoint directory, or
            a weights file; with --quantize gptq.* the finetuned model quantized by quantize/gptq.py.
    """

    lora_path: Optional[Path] = None
    adapter_path: Optional[Path] = None
    adapter_v2_path: Optional[Path] = None
    finetuned_path: Optional[Path] = None

    def given(self) -> Optional[Tuple[str, Path]]:
        """(flag name, path) of the finetuned weights asked for, None for the checkpoint alone."""
        given = [(name, path) for name, path in vars(self).items() if path is not None]
        if len(given) > 1:
            raise UserError(f"give one of {', '.join('--' + name for name, _ in given)}, not several")
        return given[0] if given else None


@dataclass
class LoadArgs:
    """How the model is loaded.

    Args:
        precision: a Lightning Fabric precision such as 32-true, bf16-true, 16-true; default
            bf16-true on GPUs that support it, 16-true on other GPUs, 32-true on CPU.
        quantize: int8 (per-row) or int4 (groups of 32; int4-g64, int4-g128), weight-only
            integers quantized while loading, the fast modes; llm.int8 (bitsandbytes int8 layers,
            quantized while loading); or gptq.int4 / gptq.int3 for a checkpoint written by
            quantize/gptq.py.
        kv_cache_dtype: the generation's KV cache: fp32, bf16, fp16, or int8 (8-bit codes with a
            scale per head and position, as llama.cpp's -ctk q8_0: a quarter of float32's memory,
            for long contexts); default the model's dtype.
    """

    precision: Optional[str] = None
    quantize: Optional[str] = None
    kv_cache_dtype: Optional[str] = None


KV_CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def parse_kv_cache_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in KV_CACHE_DTYPES:
        raise UserError(f"unknown --kv_cache_dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]


def finetuned_wrap(lora_path: Optional[Path] = None, adapter_path: Optional[Path] = None,
                   adapter_v2_path: Optional[Path] = None) -> Optional[Callable]:
    """A `wrap(model)` for load_for_inference adding LoRA or adapter weights (adapter_path: v1 or v2,
    as the file says), or None without any."""
    FinetunedArgs(lora_path, adapter_path, adapter_v2_path).given()  # at most one
    if lora_path is not None:
        return lambda model: load_lora(model, lora_path)
    if adapter_v2_path is not None:
        return lambda model: load_adapter_v2(model, adapter_v2_path)
    if adapter_path is None:
        return None
    path = Path(adapter_path)
    if path.is_dir():
        if (path / ADAPTER_V2_FILE).is_file() and not (path / ADAPTER_FILE).is_file():
            return lambda model: load_adapter_v2(model, path)
        return lambda model: load_adapter(model, path)
    _, meta = load_weights_file(path, ADAPTER_FILE)
    return lambda model: (load_adapter_v2 if meta.get("kind") == "adapter_v2" else load_adapter)(model, path)


def finetuned_source(checkpoint_dir: Path, weights: FinetunedArgs, quantize: Optional[str] = None):
    """(checkpoint dir to load, wrap or None) for the finetuned weights `weights` on `checkpoint_dir`.

    Packed GPTQ weights cannot take finetune/full.py's float weights: for gptq.* modes
    `finetuned_path` must be the finetuned model quantized by quantize/gptq.py, and is loaded on its
    own."""
    finetuned_path = weights.finetuned_path
    if finetuned_path is None:
        return checkpoint_dir, finetuned_wrap(weights.lora_path, weights.adapter_path, weights.adapter_v2_path)
    weights.given()  # at most one
    if quantize is not None and quantize.startswith("gptq."):
        if read_quantization(finetuned_path) is None:
            final = Path(finetuned_path) / "final" if (Path(finetuned_path) / "final").is_dir() else finetuned_path
            raise UserError(f"--quantize {quantize} needs the finetuned model quantized: run `python quantize/gptq.py "
                            f"--checkpoint_dir {final} --output_dir OUT` and pass OUT as --finetuned_path")
        return finetuned_path, None
    return checkpoint_dir, lambda model: load_finetuned_weights(model, finetuned_path)


def load_for_inference(checkpoint_dir: Path, precision: Optional[str] = None, wrap: Optional[Callable] = None,
                       quantize: Optional[str] = None, compile: bool = False, *, lora_path: Optional[Path] = None,
                       adapter_path: Optional[Path] = None, adapter_v2_path: Optional[Path] = None,
                       finetuned_path: Optional[Path] = None, kv_cache_dtype: Optional[str] = None):
    """(fabric, model, tokenizer) for a checkpoint directory, the model on Fabric's device in
    eval mode. Weights are memory-mapped, then moved or cast by Fabric's precision plugin.

    Finetuned weights: at most one of `lora_path`, `adapter_path` (v1 or v2, as the file says),
    `adapter_v2_path`, `finetuned_path` (finetune/full.py's weights; see finetuned_source), or any
    `wrap(model)` that changes the float model first.

    `quantize`: int8 / int4 (weight-only, lit_llama/quant/weight_only.py) and llm.int8 quantize
    the float linear layers of the blocks (after the finetuned weights, so LoRA and adapters wrap
    float layers that are then quantized) one at a time onto the device; gptq.int4 and gptq.int3
    load a checkpoint written by quantize/gptq.py, whose packed layers LoRA and adapters wrap.
    `compile`: the weights are laid out for `compile_decode_step` rather than for eager decoding.
    `kv_cache_dtype`: LoadArgs' (the model's KV caches are made in it)."""
    kv_dtype = parse_kv_cache_dtype(kv_cache_dtype)
    fabric = make_fabric(precision)
    weights = FinetunedArgs(lora_path, adapter_path, adapter_v2_path, finetuned_path)
    if weights.given() is not None:
        if wrap is not None:
            raise ValueError("give finetuned weights as a path or as `wrap`, not both")
        checkpoint_dir, wrap = finetuned_source(checkpoint_dir, weights, quantize)
    # before any weight is read, and once: the directory's files, its config, and a mode that does
    # not fit the checkpoint are each one clear line
    validate_checkpoint_dir(checkpoint_dir)
    config, quantization = read_checkpoint_config(checkpoint_dir)
    check_quantize_mode(checkpoint_dir, quantize, quantization)
    if fabric.device.type == "cpu":
        check_memory(checkpoint_dir, quantization, _weight_dtype(precision), quantize, compile)
    if quantization is not None and quantization.get("method") in LOWBIT_METHODS:
        model = build_lowbit_model(checkpoint_dir, config, quantization, fabric.device, _weight_dtype(precision))
    elif quantization is not None:
        model = build_packed_model(checkpoint_dir, config, quantization, _weight_dtype(precision))
    else:
        model = build_model(checkpoint_dir, config)
    if wrap is not None:
        model = wrap(model)
    if quantization is not None and fabric.device.type == "cpu":
        use_int4_kernels(model, _weight_dtype(precision))  # GPTQ's 4/3-bit layers through torch's int4 kernel
    if quantize == "llm.int8":
        quantize_linears(model, quantize, device=fabric.device, release_mapped=True)
    if quantize in WEIGHT_ONLY_MODES:
        quantize_weight_only(model, quantize, fabric.device, _weight_dtype(precision), release_mapped=True)
    tokenizer = Tokenizer(checkpoint_dir)
    model.kv_cache_dtype = kv_dtype
    model = fabric.setup_module(model.eval())
    if fabric.device.type == "cpu":
        decode_layout(model, compiled=compile)
    return fabric, model, tokenizer


def check_memory(checkpoint_dir: Path, quantization: Optional[dict], dtype: torch.dtype, quantize: Optional[str],
                 compile: bool) -> None:
    """UserError, before any weight is read, where loading would copy more of the weights into the
    process's own (anonymous) memory than the machine has available. Weights used in place from the
    memory-mapped file do not count: a low-bit checkpoint, or a float one in its own dtype for a
    compiled step, runs even when larger than memory (its pages are read from the file as needed)."""
    files = weight_files(checkpoint_dir)
    size = sum(f.stat().st_size for f in files if f.is_file())
    if quantization is not None and quantization.get("method") in LOWBIT_METHODS:
        return
    stored = next(iter(load_safetensors(files[0]).values()), torch.empty(0)).element_size() or 4
    if quantize in WEIGHT_ONLY_MODES:
        needed, how = size * (1 if quantize == "int8" else 0.6) / stored, f"with --quantize {quantize}"
    elif quantization is None and dtype.itemsize != stored:
        needed, how = size * dtype.itemsize / stored, f"in {str(dtype).removeprefix('torch.')}"
    elif quantization is None and not compile and not (stored == 2 and cpu_kernels.available()):
        # (half-precision weights are multiplied in place by the CPU kernel: decode_layout)
        needed, how = size * 0.75, "for eager decoding (its wide matrices are stored again column-major)"
    else:
        return
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(f"loading {checkpoint_dir} {how} needs about {needed / 1e9:.1f} GB of memory, "
                        f"{available / 1e9:.1f} GB is available (a checkpoint quantized once by "
                        "quantize/weight_only.py, or run in its own dtype with --compile true, is read from the file in place)")


def _weight_dtype(precision: Optional[str]) -> torch.dtype:
    # the dtype Fabric's precision gives the weights: half for the "-true" half precisions, float32
    # otherwise (mixed precisions keep float32 weights)
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64,
            "64": torch.float64}.get(precision or default_precision(), torch.float32)


def load_chat_model(checkpoint_dir: Path, precision: Optional[str] = None, lora_path: Optional[Path] = None,
                    adapter_path: Optional[Path] = None, template: Optional[str] = None, *,
                    adapter_v2_path: Optional[Path] = None, finetuned_path: Optional[Path] = None,
                    quantize: Optional[str] = None, compile: bool = False, kv_cache_dtype: Optional[str] = None):
    """(fabric, model, tokenizer, ChatFormat, where the template came from): load_for_inference and
    the chat template. The template is checked before the weights are read, so that a wrong name
    costs no loading time; finetuned weights choose the template recorded with them."""
    validate_checkpoint_dir(checkpoint_dir)
    given = FinetunedArgs(lora_path, adapter_path, adapter_v2_path, finetuned_path).given()
    finetuned = None if given is None else given[1]
    if finetuned is not None and not Path(finetuned).exists():
        raise UserError(f"{finetuned} does not exist")
    tmpl, source = choose_template(Tokenizer(checkpoint_dir), checkpoint_dir, template, finetuned)
    fabric, model, tokenizer = load_for_inference(checkpoint_dir, precision, quantize=quantize, compile=compile,
                                                  kv_cache_dtype=kv_cache_dtype,
                                                  lora_path=lora_path, adapter_path=adapter_path,
                                                  adapter_v2_path=adapter_v2_path, finetuned_path=finetuned_path)
    return fabric, model, tokenizer, ChatFormat(tmpl, tokenizer), source
