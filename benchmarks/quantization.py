"""Quantization of the embedded SmolLM2-135M-Instruct: perplexity, checkpoint size and peak memory of
fp32, llm.int8, GPTQ 4-bit g128 (with the embedding / head at 6 bits, 4 bits or float16), RTN
4-bit g128, GPTQ 3-bit g128 and weight-only int8 / int4 (quantized while loading), in one table.

The text is Python's reference documentation (pydoc_data.topics, offline English): GPTQ calibrates
on its first half and perplexity is measured on its second half, so no model is scored on the text
it was calibrated on. Every step runs the repo's own scripts (quantize/gptq.py, evaluate/full.py)
in a fresh process, so the peak memory of a row is that process's own. Prints the table and writes
it into docs/benchmarks.md under "Quantization".

    python benchmarks/quantization.py [--nsamples 128] [--calib_seqlen 2048] [--eval_seqlen 2048] [--max_windows N]
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, weight_files
from lit_llama.io.default_model import fetch_gguf
from lit_llama.quant.gptq import default_calibration_text

ROOT = Path(__file__).resolve().parents[1]

# label, quantize/gptq.py arguments (None: no checkpoint of its own), --quantize to load it with.
# The first GPTQ row is quantize/gptq.py's default (act-order, embedding / head at 6 bits).
DEFAULT = "GPTQ 4-bit g128 (the default: act-order, 6-bit down projections and head)"
RTN = "RTN 4-bit g128, 6-bit down projections and head"
WEIGHT_INT8, WEIGHT_INT4 = "weight-only int8 (per row, int8 head)", "weight-only int4 g32 (int8 head)"
FLOAT_HEAD = ["--head_bits", "null"]
GGUF_KEPT, KEEP = "GGUF Q4_1 kept quantized (the embedded file as shipped)", "keep"
ROWS = [
    ("fp32", None, None),
    ("llm.int8", None, "llm.int8"),
    (DEFAULT, ["--method", "gptq", "--bits", "4"], "gptq.int4"),
    ("GPTQ 4-bit g128, act-order, 4-bit head", ["--method", "gptq", "--bits", "4", "--head_bits", "4"], "gptq.int4"),
    ("GPTQ 4-bit g128, act-order, float16 head", ["--method", "gptq", "--bits", "4", *FLOAT_HEAD], "gptq.int4"),
    ("GPTQ 4-bit g128 without act-order, float16 head", ["--method", "gptq", "--bits", "4", "--act_order", "false",
                                                         *FLOAT_HEAD], "gptq.int4"),
    (RTN, ["--method", "rtn", "--bits", "4"], "gptq.int4"),
    ("GPTQ 3-bit g128, act-order, float16 head", ["--method", "gptq", "--bits", "3", *FLOAT_HEAD], "gptq.int3"),
    ("GPTQ 4-bit g128, act-order, 4-bit down projections, 6-bit head", ["--method", "gptq", "--bits", "4",
                                                                        "--down_bits", "null"], "gptq.int4"),
    # weight-only, quantized while loading (lit_llama/quant/weight_only.py): the fast modes
    (WEIGHT_INT8, None, "int8"),
    (WEIGHT_INT4, None, "int4"),
    ("weight-only int4 g64 (int8 head)", None, "int4-g64"),
    # the embedded GGUF converted with --keep_quantized: the fp32 row is the same file dequantized
    (GGUF_KEPT, KEEP, None),
]


def split_text(out_dir: Path) -> tuple:
    text = default_calibration_text()
    half = len(text) // 2
    calib, evaluation = out_dir / "calibration.txt", out_dir / "evaluation.txt"
    calib.write_text(text[:half])
    evaluation.write_text(text[half:])
    return calib, evaluation


def held_out_file(out_dir: Path) -> Path:
    """Text of other kinds than the calibration text, which every CPython installation carries: the
    license of the running Python (legal English) and IDLE's old change log (tests/test_gptq.py
    uses the same text). GPTQ can fit its calibration text's statistics; this column shows whether
    the quantized model holds up elsewhere."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [p.read_text() for p in (stdlib / "LICENSE.txt", stdlib / "idlelib" / "NEWS2x.txt") if p.exists()]
    path = out_dir / "held_out.txt"
    path.write_text("\n\n".join(parts))
    return path


def tensor_bytes(checkpoint_dir: Path) -> dict:
    """{tensor name: bytes} from the safetensors headers."""
    sizes = {}
    for f in weight_files(checkpoint_dir):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()})
    return sizes


def fp16_bytes(checkpoint_dir: Path) -> tuple:
    """(all tensors, the blocks' linear weights) of the float checkpoint at 2 bytes a weight."""
    from safetensors import safe_open

    total = linears = 0
    for f in weight_files(checkpoint_dir):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                n = 1
                for s in fh.get_slice(k).get_shape():
                    n *= s
                total += 2 * n
                linears += 2 * n if k.startswith("transformer.h.") and k.endswith(("c_attn.weight", "c_proj.weight",
                                                                                   "c_fc1.weight", "c_fc2.weight")) else 0
    return total, linears


def run(args, log: Path, timeout: int = 6 * 3600) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(map(str, args))}\n# {time.perf_counter() - t0:.0f} s\n{r.stdout}\n{r.stderr}")
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, args[:1]))} failed, see {log}: {r.stderr.strip()[-500:]}")
    return r


def evaluate(checkpoint: Path, quantize: Optional[str], text: Path, seqlen: int, max_windows: Optional[int],
             log: Path) -> dict:
    args = ["evaluate/full.py", "--checkpoint_dir", checkpoint, "--text_file", text, "--seqlen", seqlen]
    args += ["--quantize", quantize] if quantize else []
    args += ["--max_windows", max_windows] if max_windows else []
    r = run(args, log)
    load = re.search(r"Loaded in ([\d.]+) s, peak memory ([\d.]+) GB, weights ([\d.]+) MB", r.stderr)
    ev = re.search(r"Evaluated in ([\d.]+) s, peak memory ([\d.]+) GB", r.stderr)
    return {"ppl": float(r.stdout.strip().splitlines()[-1].split()[1]), "load_gb": float(load.group(2)),
            "weights_mb": float(load.group(3)), "eval_gb": float(ev.group(2)), "eval_s": float(ev.group(1))}


def targets(rows: list, fp16_total: int) -> list:
    """The issue's targets, checked against this run's rows."""
    by = {r["label"]: r for r in rows}
    fp32, gptq, rtn = by["fp32"], by[DEFAULT], by[RTN]
    ok = lambda c: "met" if c else "not met"
    inc = gptq["ppl"] / fp32["ppl"] - 1
    size = gptq["size"] / fp16_total
    held, held_rtn = gptq["held_out_ppl"] / fp32["held_out_ppl"] - 1, rtn["held_out_ppl"] / fp32["held_out_ppl"] - 1
    lines = [f"GPTQ 4-bit g128 (default settings: 6-bit down projections and head) perplexity {inc:+.1%} vs fp32 (target within 10%: {ok(inc <= 0.10)}); "
            f"RTN at the same bits and groups {rtn['ppl'] / fp32['ppl'] - 1:+.1%} (GPTQ better: {ok(gptq['ppl'] < rtn['ppl'])})",
            f"on the held-out text: GPTQ {held:+.1%} (target within 10%: {ok(held <= 0.10)}), RTN {held_rtn:+.1%} "
            f"(target GPTQ at most half of RTN's increase: {ok(held <= 0.5 * held_rtn)})",
            f"4-bit checkpoint {size:.0%} of the fp16 one (target at most 30%: {ok(size <= 0.30)}; for a "
            f"LLaMA-7B packed the same way: {seven_b_ratio(4, 6, down_bits=6):.0%})"] + [
            f"{label}: perplexity {by[label]['ppl'] / fp32['ppl'] - 1:+.2%} vs fp32 (target within {bound:.0%}: "
            f"{ok(by[label]['ppl'] / fp32['ppl'] - 1 <= bound)})"
            for label, bound in ((WEIGHT_INT8, 0.01), (WEIGHT_INT4, 0.10)) if label in by]
    if GGUF_KEPT in by:
        d = by[GGUF_KEPT]["ppl"] / fp32["ppl"] - 1
        lines.append(f"{GGUF_KEPT}: perplexity {d:+.3%} vs its dequantized checkpoint (the fp32 row; target equal "
                     f"within float rounding, 0.01%: {ok(abs(d) <= 1e-4)})")
    return lines


def seven_b_ratio(bits: int, head_bits: Optional[int] = None, groupsize: int = 128,
                  down_bits: Optional[int] = None) -> float:
    """Size of a LLaMA-7B checkpoint packed like ours (packed linears with a float16 scale and a
    one-byte zero per group, the down projections at `down_bits`; embedding and head packed at
    `head_bits` or float16; float16 norms) relative to its float16 checkpoint."""
    dim, hidden, layers, vocab = 4096, 11008, 32, 32000
    linear, down = layers * (4 * dim * dim + 3 * dim * hidden), layers * dim * hidden
    head, norms = 2 * vocab * dim, (2 * layers + 1) * dim
    packed = (linear - down) * bits / 8 + down * (down_bits or bits) / 8 + linear / groupsize * 3 + norms * 2
    packed += head * 2 if head_bits is None else head * head_bits / 8 + head / groupsize * 3
    return packed / ((linear + head + norms) * 2)


def table(rows: list, fp16_total: int, fp16_linears: int) -> str:
    fp32, held_fp32 = rows[0]["ppl"], rows[0]["held_out_ppl"]
    lines = ["| method | checkpoint (MB) | vs fp16 checkpoint | block linears vs fp16 | weights in memory (MB) "
             "| peak RSS loaded (GB) | peak RSS evaluating (GB) | perplexity | vs fp32 | held-out perplexity | vs fp32 "
             "| quantize time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['size'] / 1e6:.0f}" if r.get("size") else "(fp32 file)"
        ratio = f"{r['size'] / fp16_total:.0%}" if r.get("size") else "-"
        lin = f"{r['linear_size'] / fp16_linears:.0%}" if r.get("linear_size") else "-"
        qt = f"{r['quantize_s']:.0f} s" if r.get("quantize_s") else "-"
        weights = f"{r['weights_mb']:.0f}" if r.get("weights_mb") else "-"
        lines.append(f"| {r['label']} | {size} | {ratio} | {lin} | {weights} | {r['load_gb']:.2f} | {r['eval_gb']:.2f} "
                     f"| {r['ppl']:.3f} | {r['ppl'] / fp32 - 1:+.1%} | {r['held_out_ppl']:.3f} "
                     f"| {r['held_out_ppl'] / held_fp32 - 1:+.1%} | {qt} |")
    return "\n".join(lines)


def main(checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR, out_dir: Path = Path("out/benchmarks/quantization"),
         nsamples: int = 128, calib_seqlen: int = 2048, eval_seqlen: int = 2048, max_windows: Optional[int] = None,
         reuse: bool = False, write_docs: bool = True, rows: Optional[List[int]] = None) -> None:
    """Args:
        checkpoint_dir: the float checkpoint (default: the embedded SmolLM2-135M-Instruct).
        out_dir: where the quantized checkpoints, the two halves of the text and the logs go.
        nsamples: GPTQ calibration windows; calib_seqlen: tokens per window.
        eval_seqlen: tokens per evaluation window; max_windows: evaluate only the first windows.
        reuse: keep the quantized checkpoints and the rows measured (same settings) already in out_dir.
        write_docs: write the table into docs/benchmarks.md.
        rows: indices of the rows to run (default: all; fp32, the default GPTQ and RTN always).
    """
    load_before = os.getloadavg()[0]
    checkpoint_dir, out_dir = ROOT / checkpoint_dir, ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    calib, evaluation = split_text(out_dir)
    held_out = held_out_file(out_dir)
    chosen = [r for i, r in enumerate(ROWS) if rows is None or i in rows or r[0] in ("fp32", DEFAULT, RTN)]
    fp16_total, fp16_linears = fp16_bytes(checkpoint_dir)
    # rows measured before with the same settings are kept with --reuse (a long run can be resumed)
    settings = {"checkpoint": str(checkpoint_dir), "nsamples": nsamples, "calib_seqlen": calib_seqlen,
                "eval_seqlen": eval_seqlen, "max_windows": max_windows, "held_out": True}
    cache_file = out_dir / "results.json"
    cache = json.loads(cache_file.read_text()) if reuse and cache_file.is_file() else {}
    if cache.get("settings") != settings:
        # quantized checkpoints of other settings (calibration size) are not reused either
        cache, reuse = {"settings": settings, "rows": {}}, False
    rows, reused = [], []
    for i, (label, qargs, quantize) in enumerate(chosen):
        if label in cache["rows"]:
            rows.append(cache["rows"][label])
            reused.append(label)
            continue
        row = {"label": label}
        checkpoint = checkpoint_dir
        if qargs is not None:
            checkpoint = out_dir / re.sub(r"\W+", "-", label.lower())
            if not (reuse and checkpoint.is_dir()):
                t0 = time.perf_counter()
                if qargs == KEEP:
                    shutil.rmtree(checkpoint, ignore_errors=True)
                    run(["scripts/convert_gguf_checkpoint.py", "--gguf_path", fetch_gguf(), "--output_dir", checkpoint,
                         "--keep_quantized", "true"], out_dir / f"quantize-{i}.log")
                else:
                    run(["quantize/gptq.py", "--checkpoint_dir", checkpoint_dir, "--output_dir", checkpoint, *qargs,
                         "--groupsize", 128, "--text_file", calib, "--nsamples", nsamples, "--seqlen", calib_seqlen],
                        out_dir / f"quantize-{i}.log")
                row["quantize_s"] = time.perf_counter() - t0
            sizes = tensor_bytes(checkpoint)
            row["size"] = sum(sizes.values())
            row["linear_size"] = sum(v for k, v in sizes.items() if k.startswith("transformer.h.")
                                     and k.endswith(("qweight", "scales", "zeros", "perm")))
        row.update(evaluate(checkpoint, quantize, evaluation, eval_seqlen, max_windows, out_dir / f"evaluate-{i}.log"))
        row["held_out_ppl"] = evaluate(checkpoint, quantize, held_out, eval_seqlen, None,
                                       out_dir / f"evaluate-held-out-{i}.log")["ppl"]
        print(f"{label}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
        cache["rows"][label] = row
        cache_file.write_text(json.dumps(cache, indent=2))
    windows = f"the first {max_windows} windows" if max_windows else "all windows"
    load = f"{load_before:.1f} before the run and {os.getloadavg()[0]:.1f} at its end on {os.cpu_count()} cores"
    text = (table(rows, fp16_total, fp16_linears) + "\n\n"
            f"Perplexity over {windows} of {eval_seqlen} tokens of the second half of pydoc_data.topics; GPTQ "
            f"calibrated on {nsamples} windows of {calib_seqlen} tokens of the first half. Held-out perplexity: over "
            f"the windows of {eval_seqlen} tokens of another kind of text, Python's LICENSE.txt and IDLE's NEWS2x.txt "
            "(legal English and a change log). Weights in memory: "
            "the loaded model's parameters and buffers (int8 or packed layers, the embedding packed or float32, float32 norms). "
            "Peak RSS (ru_maxrss) of the evaluating process: once loaded, and at the end; the float32 "
            "checkpoint is memory-mapped, so its weights count only once read. The tied embedding / head is "
            f"{1 - fp16_linears / fp16_total:.0%} of the parameters here (fp16 checkpoint {fp16_total / 1e6:.0f} MB, "
            f"block linears {fp16_linears / 1e6:.0f} MB of it); \"float16 head\" rows keep it unpacked, as "
            "GPTQ-for-LLaMa does. A LLaMA-7B packed the same way would be "
            f"{seven_b_ratio(4, 6, down_bits=6):.0%} (4-bit, 6-bit down projections and head), "
            f"{seven_b_ratio(4, 6):.0%} (4-bit, 6-bit head), {seven_b_ratio(4):.0%} (4-bit, float16 head) and "
            f"{seven_b_ratio(3):.0%} (3-bit, float16 head) of its fp16 checkpoint. "
            "Weight-only rows quantize the float32 checkpoint while loading (`--quantize int8|int4|int4-g64`). "
            "The embedded weights were converted from a Q4_1 GGUF (4 bits in groups of 32 with a minimum): "
            "int4 g32's min-max grid nearly reproduces them and g64's cannot, so on this model int4 g32 loses "
            "less than int8 does; on a model trained in float it would lose more. "
            f"Times are wall-clock on a shared machine (load average {load}).")
    if reused:
        text += f" Rows measured by an earlier run with the same settings (--reuse): {'; '.join(reused)}."
    text += "\n\n" + "\n".join(f"- {line}" for line in targets(rows, fp16_total))
    print(text)
    if write_docs:
        from report import write_section  # benchmarks/report.py: this script's folder is first on sys.path

        command = " ".join(["python benchmarks/quantization.py", *sys.argv[1:]])
        write_section("Quantization", text, command)


if __name__ == "__main__":
    from lit_llama.utils import run_cli

    run_cli(main)
