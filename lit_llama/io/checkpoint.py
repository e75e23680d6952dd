"""A checkpoint directory: `lit_config.json`, weights in safetensors, and the tokenizer files.

Loading memory-maps the weights (no second copy in RAM, no code run from the file); writing
streams tensor by tensor into shards and becomes visible only when complete (atomic rename).

Why one file: the directory's layout, its safetensors reader and writer, and the integer layers it
may hold (QuantizedRows) are one format; a reader split from its writer drifts from it.
"""

import ctypes
import functools
import json
import mmap
import struct
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lit_llama.model import Config, LLaMA
from lit_llama.utils import UserError, atomic_dir, atomic_file

CONFIG_FILE = "lit_config.json"
# the lit_config.json entry of a packed checkpoint: bits, groupsize, act_order, method, and optional
# head (bits, groupsize, act_order), layers ({name: {bits}}), calibration (where the text came from)
QUANTIZATION_KEY = "quantization"
# the methods of a checkpoint of integer layers in the low-bit layout: integers kept from a GGUF file
# (scripts/convert_gguf_checkpoint.py --keep_quantized) or quantized by quantize/weight_only.py. The
# entry's `layers` maps each integer layer to {bits, groupsize, type, shape} (tile_entry), and the
# layer's tensors are `codes` and `sm` (tile_tensors); inference loads them without --quantize
KEPT_METHOD = "gguf"
WEIGHT_ONLY_METHOD = "weight_only"
LOWBIT_METHODS = (KEPT_METHOD, WEIGHT_ONLY_METHOD)
WEIGHTS_FILE = "lit_model.safetensors"
INDEX_FILE = "lit_model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# chat_template.jinja: where recent transformers saves the chat template; lit_template.json: the
# name of the chat template recorded by lit_llama (lit_llama/templates.py)
TOKENIZER_EXTRAS = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "lit_template.json")
DEFAULT_CHECKPOINT_DIR = Path("checkpoints/SmolLM2-135M-Instruct")
# the same model with the shipped GGUF's Q4_1/Q8_0 integers kept as they are (the float checkpoint above
# is their dequantization, so both hold the same weights): what generate.py, chat.py and serve.py run
# without --checkpoint_dir, as llama.cpp runs the file, on the low-bit kernel (finetuning needs the float one)
DEFAULT_INFERENCE_DIR = Path("checkpoints/SmolLM2-135M-Instruct-Q4_1")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(UserError):
    pass


# ---------------------------------------------------------------- safetensors, read and write


def load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file, memory-mapped: pages are read from disk when first used.

    The format is a little-endian u64 header length, a JSON header of dtype/shape/offsets, then
    raw data; every offset is checked against the file size so a truncated file is reported."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is corrupted: its header is not valid JSON")
        # a private (copy-on-write) map: tensors may be modified in memory, never the file
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
    if mm is not None and hasattr(mm, "madvise") and size < (available_memory() or 0) // 2:
        # read the file ahead, in large requests, while the model is being built: a start then waits
        # for the disk's sequential speed instead of one page fault at a time (a file larger than
        # memory is left to be read as it is used)
        mm.madvise(mmap.MADV_WILLNEED)
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupted or uses an unsupported dtype (tensor {name!r})")
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or 8 + n + end > size:
            raise CheckpointError(f"{path} is truncated or corrupted (tensor {name!r} runs past the end)")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=8 + n + begin).view(shape)
    return out


def available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- integer weights kept as they are


@dataclass
class QuantizedRows:
    """A weight (out, in) kept as integers, w = q * scales + zeros for each group of `groupsize`
    inputs of a row: q (out, in) integer codes of `bits` bits (4: 0..15, 8: -128..127), scales and
    zeros (out, in / groupsize) float32. Every row is independent (GGUF's blocks run along the
    inputs), so the converters' row operations (the rotary permutation, vocabulary padding,
    stacking q, k and v) apply to q, scales and zeros alike; `qtype` names the source's format."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    groupsize: int
    bits: int
    qtype: str

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def map_rows(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedRows":
        return replace(self, q=f(self.q), scales=f(self.scales), zeros=f(self.zeros))

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        g = self.q.float().view(rows, -1, self.groupsize)
        return (g * self.scales[..., None] + self.zeros[..., None]).view(rows, cols)

    def regroup(self, groupsize: int) -> "QuantizedRows":
        """The same numbers with 8-bit codes and smaller groups (each group's scale repeated)."""
        r = self.groupsize // groupsize
        return replace(self, scales=self.scales.repeat_interleave(r, 1), zeros=self.zeros.repeat_interleave(r, 1),
                       groupsize=groupsize, bits=8)


TILE_ROWS = 16  # rows per tile of the low-bit layout: the lanes of an AVX-512 float register


def lowbit_tiles(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The low-bit layout, which the CPU kernel (lit_llama/csrc/lowbit_matmul.cpp) reads and a
    checkpoint stores, of unsigned `bits`-bit codes q (out, in) with per-group scales and offsets
    (out, groups), w = q s + m: codes (T, in/P, 64) uint8, T = out/16 tiles (the rows padded with
    zeros to a multiple of 16), P = 32 / bits codes a word, for each tile and block of P inputs the
    16 rows' little-endian 32-bit words side by side, input Pb + n in bits `bits` n..; and sm
    (T, groups, 2, 16), each tile's scales then its offsets for each group, or (T, groups, 1, 16),
    the scales alone, where every offset is m = -2^(bits-1) s (symmetric: GGUF's Q4_0, Q8_0, Q6_K,
    our int8), in float16 where that holds them exactly (our quantizers', GGUF's Q4_0/Q4_1/Q8_0/Q5_x),
    else in float32 (K-quants' products of two scales, GPTQ's offsets s * zero)."""
    rows, cols = q.shape
    pad = -rows % TILE_ROWS
    if pad:  # zero rows: zero codes, scales and offsets are a zero weight
        q, scales, mins = (torch.cat([t, t.new_zeros(pad, t.size(1))]) for t in (q, scales, mins))
    tiles, per_byte = (rows + pad) // TILE_ROWS, 8 // bits
    parts = q.to(torch.uint8).view(tiles, TILE_ROWS, cols // (4 * per_byte), 4, per_byte)
    words = parts[..., 0] if per_byte == 1 else parts[..., 0] | (parts[..., 1] << 4)  # (tiles, 16, blocks, 4 bytes)
    codes = words.permute(0, 2, 1, 3).reshape(tiles, -1, 4 * TILE_ROWS).contiguous()
    symmetric = torch.equal(mins.float(), -(2 ** (bits - 1)) * scales.float())
    sm = torch.stack((scales.float(),) if symmetric else (scales.float(), mins.float()), dim=1)
    sm = sm.view(tiles, TILE_ROWS, sm.size(1), -1).permute(0, 3, 2, 1).contiguous()
    return codes, sm.half() if torch.equal(sm.half().float(), sm) else sm


def untile(codes: torch.Tensor, sm: torch.Tensor, bits: int, rows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of lowbit_tiles: (q uint8 (rows, in), scales float32 (rows, groups), mins)."""
    tiles = codes.size(0)
    words = codes.view(tiles, -1, TILE_ROWS, 4).permute(0, 2, 1, 3).reshape(tiles * TILE_ROWS, -1)  # bytes of each row
    q = words if bits == 8 else torch.stack((words & 15, words >> 4), dim=-1).flatten(-2)
    s, m = scales_and_mins(sm.float().permute(0, 3, 2, 1).reshape(tiles * TILE_ROWS, sm.size(2), -1), 1, bits)
    return q[:rows], s[:rows], m[:rows]


def scales_and_mins(sm: torch.Tensor, dim: int, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scales and offsets of a layout's `sm` whose dimension `dim` holds them (size 2), or the
    scales alone (size 1: symmetric, m = -2^(bits-1) s)."""
    if sm.size(dim) == 1:
        s = sm.squeeze(dim)
        return s, -(2 ** (bits - 1)) * s
    return sm.unbind(dim)


def tile_tensors(w: QuantizedRows) -> Dict[str, torch.Tensor]:
    """How a checkpoint stores an integer layer: its low-bit layout (lowbit_tiles), `codes` and `sm`,
    so that loading maps the file's pages and the kernel reads them in place."""
    q, mins = w.q, w.zeros
    if w.bits == 8:  # signed codes -> unsigned: w = (q + 128) s + (z - 128 s); q + 128 flips the sign bit
        q, mins = w.q.to(torch.int8).view(torch.uint8) ^ 0x80, w.zeros - 128 * w.scales
    codes, sm = lowbit_tiles(q, w.scales, mins, w.bits)
    return {"codes": codes, "sm": sm}


def tile_entry(w: QuantizedRows) -> dict:
    """The quantization entry's record of a layer stored by tile_tensors."""
    return {"bits": w.bits, "groupsize": w.groupsize, "type": w.qtype, "shape": list(w.shape)}


def read_tiles(state_dict: Dict[str, torch.Tensor], layer: str, info: dict,
               where: Path) -> Tuple[torch.Tensor, torch.Tensor, int, int, Tuple[int, int]]:
    """(codes, sm, bits, groupsize, (out, in)) of a layer that tile_tensors stored under `layer`
    with entry `info`, taken out of `state_dict` (as they are: memory-mapped)."""
    if "shape" not in info and f"{layer}.qweight" in state_dict:
        raise CheckpointError(f"{where} was written by an older lit_llama, which stored integer layers as rows: "
                              "convert the GGUF file or quantize the model again")
    try:
        bits, groupsize, (rows, cols) = int(info["bits"]), int(info["groupsize"]), (int(d) for d in info["shape"])
        codes, sm = state_dict.pop(f"{layer}.codes"), state_dict.pop(f"{layer}.sm")
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: the integer layer {layer} is missing or its entry is corrupted")
    tiles = -(-rows // TILE_ROWS)
    if (bits not in (4, 8) or groupsize <= 0 or cols % groupsize or codes.dtype != torch.uint8
            or tuple(codes.shape) != (tiles, cols * bits // 32, 4 * TILE_ROWS)
            or sm.dim() != 4 or sm.size(2) not in (1, 2) or sm.dtype not in (torch.float16, torch.float32)
            or tuple(sm.shape) != (tiles, cols // groupsize, sm.size(2), TILE_ROWS)):
        raise CheckpointError(f"{where}: the integer layer {layer} does not match its entry {info}")
    return codes, sm, bits, groupsize, (rows, cols)


# ---------------------------------------------------------------- memory-mapped pages, given back once used


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _file_backed(address: int) -> bool:
    # /proc/self/maps lines: "start-end perms offset dev inode path"; inode 0 is anonymous memory
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            start, end = (int(a, 16) for a in parts[0].split("-"))
            if start <= address < end:
                return len(parts) >= 6 and parts[4] != "0"
    return False


def release_mapped_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a tensor memory-mapped from a file (a weight loaded from a
    checkpoint) once it is no longer needed: they would otherwise count in the process's memory
    until the whole file is unmapped. Only whole pages inside the tensor are dropped (neighbours
    keep theirs), and only for a file mapping, which reads the data back from the file if it is
    touched again; anything else (Linux only, CPU only) is left alone. `t` may be a numpy array
    (a GGUF file's tensor, mapped by the gguf package)."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            return
        start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    else:
        start, nbytes = t.ctypes.data, t.nbytes
    if nbytes == 0 or not sys.platform.startswith("linux"):
        return
    end = start + nbytes
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first or not _file_backed(start):
        return
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def release_freed_heap() -> None:
    """Give memory freed by temporaries back to the OS (glibc's malloc_trim). Without it, a layer's
    freed float copy stays in the heap below the int8 weights allocated after it: quantizing layer
    by layer would still end at several times the int8 size."""
    if sys.platform.startswith("linux"):
        try:
            _libc().malloc_trim(0)
        except AttributeError:  # not glibc
            pass


class ShardedWriter:
    """Writes tensors one at a time into safetensors shards of at most `shard_bytes`, each tensor's
    bytes going to the file as it is added: peak memory is one tensor, whatever the model's size.
    The header, known only when a shard is complete, goes into room reserved at the shard's start
    (the format lets a header end in spaces). Several shards get an index like Hugging Face's."""

    HEADER_ROOM = 1 << 20  # bytes reserved for a shard's header: ~6,000 tensors

    def __init__(self, out_dir: Path, shard_bytes: int = 4 << 30):
        self.out_dir, self.shard_bytes = Path(out_dir), shard_bytes
        self.file = None
        self.header: Dict[str, dict] = {}
        self.header_len = 0  # the JSON length of the header's entries so far
        self.offset = 0  # bytes of data in the open shard
        self.shards: List[List[str]] = []
        self.names = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        entry = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [self.offset, self.offset + nbytes]}
        # a new shard when this one is full, its header room is, or the tensor would start unaligned
        # for its type (the format allows no gaps between tensors to pad with)
        if self.file is None or (self.offset and (self.offset + nbytes > self.shard_bytes
                                                  or self.offset % t.element_size()
                                                  or self.header_len + 2 * len(name) + 200 > self.HEADER_ROOM)):
            self._next_shard()
            entry["data_offsets"] = [0, nbytes]
        if nbytes:
            self.file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.header[name] = entry
        self.header_len += len(json.dumps({name: entry}))
        self.offset += nbytes
        self.names.add(name)

    def _next_shard(self) -> None:
        self._finish_shard()
        self.file = open(self.out_dir / f"shard-{len(self.shards):05d}.safetensors", "wb")
        self.file.write(bytes(8 + self.HEADER_ROOM))  # filled in by _finish_shard
        self.header, self.header_len, self.offset = {}, 100, 0  # 100: the metadata entry and braces

    def _finish_shard(self) -> None:
        if self.file is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}).encode()
        header = header.ljust(-(-len(header) // 8) * 8, b" ")  # the data 8-byte aligned, as safetensors writes it
        if self.offset < 16 * self.HEADER_ROOM:  # a small shard: written again without the spare room
            self.file.close()
            path = Path(self.file.name)
            data = path.read_bytes()[8 + self.HEADER_ROOM:]
            path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        else:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.HEADER_ROOM) + header.ljust(self.HEADER_ROOM, b" "))
            self.file.close()
        self.shards.append(list(self.header))
        self.file = None

    def close(self) -> None:
        if self.file is None and not self.shards:
            self._next_shard()  # an empty model still gets its (empty) weights file
        self._finish_shard()
        if len(self.shards) == 1:
            (self.out_dir / "shard-00000.safetensors").rename(self.out_dir / WEIGHTS_FILE)
            return
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"lit_model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.safetensors").rename(self.out_dir / fname)
            weight_map.update({name: fname for name in names})
        (self.out_dir / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}, indent=2))


def write_config(out_dir: Path, config: Config, quantization: Optional[dict] = None) -> None:
    """lit_config.json: the architecture's fields and, for a checkpoint written by quantize/gptq.py,
    a `quantization` entry saying how its weights are packed (read_checkpoint_config reads both)."""
    fields = config.asdict()
    if quantization is not None:
        fields[QUANTIZATION_KEY] = quantization
    (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(fields, indent=2))


# ---------------------------------------------------------------- reading a checkpoint directory


def weight_files(checkpoint_dir: Path) -> List[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise CheckpointError(f"{index} is corrupted")
        return [checkpoint_dir / n for n in names]
    return [checkpoint_dir / WEIGHTS_FILE]


def validate_checkpoint_dir(checkpoint_dir: Path) -> None:
    """Raise a CheckpointError that names every file the directory lacks."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        hint = ""
        if checkpoint_dir in (DEFAULT_CHECKPOINT_DIR, DEFAULT_INFERENCE_DIR):
            hint = " (run `make model` or `python scripts/prepare_default_model.py` to create it)"
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist{hint}")
    missing = [] if (checkpoint_dir / CONFIG_FILE).is_file() else [CONFIG_FILE]
    missing += [f.name for f in weight_files(checkpoint_dir) if not f.is_file()]
    if not any((checkpoint_dir / t).is_file() for t in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} is incomplete: missing {', '.join(missing)}")


def read_checkpoint_config(checkpoint_dir: Path) -> Tuple[Config, Optional[dict]]:
    """(the architecture, the quantization entry or None for float weights) of lit_config.json,
    parsed once: the file's only reader."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    try:
        fields = json.loads(path.read_text())
        # how quantize/gptq.py packed the weights (lit_llama.quant.packed reads it), not the architecture
        quantization = fields.pop(QUANTIZATION_KEY, None)
        return Config(**fields), quantization
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid model config: {e}")


def load_config(checkpoint_dir: Path) -> Config:
    return read_checkpoint_config(checkpoint_dir)[0]


def read_quantization(checkpoint_dir: Path) -> Optional[dict]:
    """The quantization entry of a checkpoint (None for a float one, or where the config cannot be
    read: validate_checkpoint_dir and read_checkpoint_config report that)."""
    try:
        return read_checkpoint_config(checkpoint_dir)[1]
    except (OSError, CheckpointError):
        return None


def packed_mode(quantization: dict) -> Optional[str]:
    """The --quantize mode that loads a packed checkpoint (None: it loads without one)."""
    if quantization.get("method") in LOWBIT_METHODS:
        return None
    return f"gptq.int{quantization.get('bits')}"


def describe_lowbit(quantization: dict) -> str:
    """What a low-bit checkpoint holds, for messages."""
    if quantization.get("method") == KEPT_METHOD:
        return "a GGUF file's integers kept as they are (--keep_quantized)"
    return f"weights quantized to {quantization.get('mode')} by quantize/weight_only.py"


def load_state_dict(checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    state_dict = {}
    for f in weight_files(checkpoint_dir):
        state_dict.update(load_safetensors(f))
    return state_dict


def load_model(checkpoint_dir: Path, config: Optional[Config] = None) -> LLaMA:
    """The model of a checkpoint directory on CPU, its parameters memory-mapped from the file.

    It is built on the meta device (no allocation) and the file's tensors are assigned in place;
    `config` replaces the directory's own."""
    validate_checkpoint_dir(checkpoint_dir)
    own, quantization = read_checkpoint_config(checkpoint_dir)
    if quantization is not None and quantization.get("method") in LOWBIT_METHODS:
        raise CheckpointError(f"{checkpoint_dir} holds {describe_lowbit(quantization)}: the inference scripts load "
                              "it; this needs the float model it was made from")
    if quantization is not None:
        # packed integer weights fit no float model: only lit_llama.quant.packed.load_packed_model reads them
        raise CheckpointError(f"{checkpoint_dir} holds {quantization.get('bits')}-bit weights packed by "
                              f"quantize/gptq.py: load it with --quantize {packed_mode(quantization)}")
    return build_model(checkpoint_dir, config or own)


def build_model(checkpoint_dir: Path, config: Config) -> LLaMA:
    """The float model of `config` with the weights of a directory already validated and whose
    config was read (load_model does both first)."""
    with torch.device("meta"):
        model = LLaMA(config)
    state_dict = load_state_dict(checkpoint_dir)
    check_state_dict(model, state_dict, checkpoint_dir)
    model.load_state_dict(state_dict, assign=True)
    return model


def check_state_dict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], where) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = [f"missing tensors {missing[:5]}"] if missing else []
        parts += [f"unexpected tensors {unexpected[:5]}"] if unexpected else []
        raise CheckpointError(f"weights in {where} do not match the config: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state_dict[k].shape):
            raise CheckpointError(f"weights in {where}: {k} has shape {tuple(state_dict[k].shape)}, "
                                  f"the config needs {tuple(v.shape)}")


def torch_load(path: Path) -> Dict[str, torch.Tensor]:
    """A PyTorch pickle, memory-mapped, with `weights_only=True`: a file whose pickle would run
    code is refused instead of executed."""
    import pickle
    import warnings
    import zipfile

    # mmap needs torch.save's zip format; older (legacy tar/pickle) files are read whole
    mmap = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before it refuses or loads: noise next to our message
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False; show the reason instead
        reasons = [l.strip() for l in str(e).splitlines() if "GLOBAL" in l or "Unsupported" in l]
        reason = f" ({reasons[0]})" if reasons else ""
        raise CheckpointError(f"refusing to load {path}: its pickle is not plain weights{reason}")
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({str(e).splitlines()[0][:200]})")


def save_checkpoint(out_dir: Path, model: LLaMA, tokenizer_dir: Optional[Path] = None,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write `model` (or `state_dict` for model's config) as a checkpoint directory, atomically,
    copying the tokenizer files."""
    with atomic_dir(out_dir) as tmp:
        writer = ShardedWriter(tmp)
        for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
            writer.add(name, tensor)
        writer.close()
        write_config(tmp, model.config)
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# ---------------------------------------------------------------- small weight files (LoRA, adapters)


def save_weights_file(path: Path, tensors: Dict[str, torch.Tensor], metadata: dict) -> None:
    """A safetensors file of a few tensors plus a JSON `metadata` dict (e.g. the LoRA config),
    written atomically."""
    from safetensors.torch import save_file

    with atomic_file(Path(path)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"lit_llama": json.dumps(metadata)})


def load_weights_file(path: Path, default_name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by save_weights_file; `path` may be the file or the
    folder that holds `default_name`."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    tensors = load_safetensors(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    try:
        return tensors, json.loads(meta.get("lit_llama", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupted metadata")


def load_finetuned_weights(model: LLaMA, path: Path) -> LLaMA:
    """Replace `model`'s weights with a finetuned checkpoint of the same architecture: a checkpoint
    directory, finetune/full.py's out_dir (its `final` folder), or a weights file."""
    path = Path(path)
    if (path / "final").is_dir():
        path = path / "final"
    if path.is_dir():
        validate_checkpoint_dir(path)
        state_dict = load_state_dict(path)
    elif path.is_file():
        state_dict = load_safetensors(path)
    else:
        raise CheckpointError(f"{path} does not exist")
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, assign=True)
    return model
