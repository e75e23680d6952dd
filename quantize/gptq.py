"""Quantize a checkpoint's linear layers to packed 4-bit or 3-bit integers with GPTQ (or RTN)."""

from pathlib import Path
from typing import Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.quant.gptq import DEFAULT_SINK_SHARE, GPTQSettings, quantize_checkpoint
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    output_dir: Optional[Path] = None,
    bits: int = 4,
    groupsize: int = 128,
    method: str = "gptq",
    text_file: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    nsamples: int = 128,
    seqlen: Optional[int] = None,
    act_order: bool = True,
    head_bits: Optional[int] = 6,
    down_bits: Optional[int] = 6,
    percdamp: float = 0.01,
    sink_share: float = DEFAULT_SINK_SHARE,
    seed: int = 0,
    device: Optional[str] = None,
) -> None:
    """Quantize a checkpoint's block linear layers to packed 4-bit or 3-bit weights with GPTQ or RTN.

    The output is a checkpoint directory whose layers hold packed integers (two 4-bit or eight 3-bit
    weights in three bytes, a float16 scale and an integer zero point per group); load it with
    `--quantize gptq.int4` (or gptq.int3) in generate.py, the generate/ and the evaluate/ scripts.

    Args:
        checkpoint_dir: the float checkpoint directory to quantize.
        output_dir: the checkpoint directory to write (default: checkpoint_dir-METHOD-intBITS-gGROUPSIZE).
        bits: 4 or 3.
        groupsize: inputs sharing a scale and zero point (a layer's last group may be shorter); -1
            for one per output row.
        method: gptq (error feedback from calibration data) or rtn (round to nearest, no data).
        text_file: a UTF-8 text to calibrate on; the default is Python's reference documentation.
        data_dir: calibrate on a dataset prepared by scripts/prepare_*.py instead.
        nsamples: calibration windows, taken at random positions of the text.
        seqlen: tokens per window (default: the model's context, at most 2048).
        act_order: quantize the columns in order of decreasing activation (GPTQ's act-order; on the
            embedded model it halves the perplexity increase of 4-bit g128, see docs/benchmarks.md).
        head_bits: bits of the embedding and the output head (3, 4, 6 or 8; same group size), or null
            to keep them float16 as GPTQ-for-LLaMa does. They are packed too by default: a tied
            embedding is a fifth of a small model (the 4-bit checkpoint of the embedded model is 42%
            of its float16 size with them float, 29% with them at 6 bits, 32% with the down
            projections at 6 bits too; see docs/benchmarks.md).
        down_bits: bits of the MLP's down projections (3, 4, 6 or 8; same group size), or null for
            --bits. Their input statistics are the calibration text's kind, so GPTQ's error feedback
            there does not carry over to other text: at 4 bits the embedded model calibrated on
            Python's docs loses 19% perplexity on license texts, 8% with them at 6 bits (a quarter of
            the block weights; llama.cpp's Q4_K_M keeps ffn_down at 6 bits likewise).
        percdamp: dampening of the Hessian, a fraction of its mean diagonal.
        sink_share: the share of each calibration window's Hessian weight given to its first
            position, the attention sink every later token reads (0: count it as one token, as
            plain GPTQ does, which on the embedded model makes GPTQ worse than RTN on new text).
        seed: seed of the window positions.
        device: where each block is quantized (default: cuda if available, else cpu).
    """
    if output_dir is None:
        output_dir = checkpoint_dir.with_name(f"{checkpoint_dir.name}-{method}-int{bits}-g{groupsize}")
    settings = GPTQSettings(method=method, bits=bits, groupsize=groupsize, act_order=act_order, percdamp=percdamp,
                            head_bits=head_bits, down_bits=down_bits, sink_share=sink_share)
    quantize_checkpoint(checkpoint_dir, output_dir, settings, text_file=text_file, data_dir=data_dir,
                        nsamples=nsamples, seqlen=seqlen, seed=seed, device=device)
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    run_cli(main)
