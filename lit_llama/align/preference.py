"""Preference data: (prompt, chosen, rejected) triples for reward modelling and DPO.

Three row forms are read from JSON or JSONL (optionally gzipped):

* ``{"prompt", "chosen", "rejected"}``: the prompt and the two answers, concatenated verbatim;
* StackExchange-paired's ``{"question", "response_j", "response_k"}`` (response_j is the better
  answer), rendered with StackLLaMA's template ``"Question: {question}\\n\\nAnswer: {answer}"``;
* Anthropic HH-RLHF's ``{"chosen", "rejected"}``, whole dialogues that share everything up to the
  last ``"\\n\\nAssistant:"``, which is the prompt.

A prepared folder holds ``train.pt`` and ``val.pt``, lists of ``{"chosen", "rejected",
"prompt_length"}`` (token ids of prompt + answer + EOS, and how many of the leading ids are the
prompt), and ``meta.json`` with the tokenizer's fingerprint, like lit_llama/data/instruction.py's folders.
"""

import gzip
import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from lit_llama.data.instruction import IGNORE_INDEX, InstructionBatches, download, tokenizer_fingerprint
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, atomic_dir

STACKLLAMA_TEMPLATE = "Question: {question}\n\nAnswer: "
HH_ASSISTANT = "\n\nAssistant:"
KIND = "preferences"


def stackllama_prompt(question: str) -> str:
    return STACKLLAMA_TEMPLATE.format(question=question)


def read_preference_file(path: Path) -> List[Dict[str, str]]:
    """Rows of a JSON list or JSONL file (``.gz`` allowed) as {"prompt", "chosen", "rejected"}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    raw_bytes = path.read_bytes()
    try:
        text = (gzip.decompress(raw_bytes) if raw_bytes[:2] == b"\x1f\x8b" else raw_bytes).decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"{path} is not UTF-8 JSON or JSONL ({e})")
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not JSON ({e})")
    else:
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {n} is not JSON ({e.msg}, column {e.colno})")
    if not raw:
        raise UserError(f"{path} holds no records")
    return [normalise_row(r, path, i) for i, r in enumerate(raw)]


def normalise_row(row, path: Path, i: int) -> Dict[str, str]:
    """One row as {"prompt", "chosen", "rejected"}; a row that fits no known form, or whose two
    answers are the same, is a UserError naming the file and the row (counted from 0)."""
    where = f"{path}: row {i}"
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object")
    if all(k in row for k in ("question", "response_j", "response_k")):
        out = {"prompt": stackllama_prompt(_text(row, "question", where)),
               "chosen": _text(row, "response_j", where), "rejected": _text(row, "response_k", where)}
    elif all(k in row for k in ("prompt", "chosen", "rejected")):
        out = {k: _text(row, k, where) for k in ("prompt", "chosen", "rejected")}
    elif all(k in row for k in ("chosen", "rejected")) and "prompt" not in row:
        out = _split_hh(_text(row, "chosen", where), _text(row, "rejected", where), where)
    else:
        present = sorted(row)[:6]
        raise UserError(f"{where} lacks the fields prompt, chosen, rejected (or StackExchange-paired's "
                        f"question, response_j, response_k); it has {present}")
    if not out["chosen"].strip() or not out["rejected"].strip():
        raise UserError(f"{where} has an empty answer")
    if out["chosen"] == out["rejected"]:
        raise UserError(f"{where} has identical chosen and rejected answers")
    return out


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if value is None or isinstance(value, (dict, list)):
        raise UserError(f"{where}: field {key!r} is not text")
    return str(value)


def _split_hh(chosen: str, rejected: str, where: str) -> Dict[str, str]:
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise UserError(f"{where} has chosen and rejected but no prompt field, and no {HH_ASSISTANT!r} turn "
                        f"to take the prompt from")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise UserError(f"{where}: chosen and rejected do not share the dialogue before the last assistant turn")
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer: Tokenizer, row: Dict[str, str], max_seq_length: int) -> Dict[str, object]:
    """Token ids of prompt + chosen + EOS and prompt + rejected + EOS, and the prompt's length.

    Each sequence is encoded whole (as it will be scored); the prompt is the longest prefix the two
    share with the prompt encoded alone, so a token merged across the prompt/answer boundary counts
    as answer. Too long a pair first loses the start of its prompt (down to half of
    `max_seq_length`, keeping BOS), then the end of its answers."""
    prompt_ids = tokenizer.encode(row["prompt"]).tolist()
    seqs = [tokenizer.encode(row["prompt"] + row[k], eos=True).tolist() for k in ("chosen", "rejected")]
    n_prompt = min(_common_prefix(prompt_ids, s) for s in seqs)
    n_prompt = min(n_prompt, _common_prefix(*seqs))
    prompt, answers = seqs[0][:n_prompt], [s[n_prompt:] for s in seqs]
    longest = max(len(a) for a in answers)
    if len(prompt) + longest > max_seq_length and len(prompt) > max_seq_length // 2:
        keep = max(max_seq_length // 2, max_seq_length - longest)
        bos = prompt[:1] if tokenizer.bos_id is not None and prompt[:1] == [tokenizer.bos_id] else []
        prompt = bos + prompt[len(prompt) - (keep - len(bos)):]
    room = max_seq_length - len(prompt)
    chosen, rejected = (torch.tensor(prompt + a[:room], dtype=torch.long) for a in answers)
    return {"chosen": chosen, "rejected": rejected, "prompt_length": len(prompt)}


def prepare_preference_data(rows: List[Dict[str, str]], checkpoint_dir: Path, destination: Path,
                            max_seq_length: int = 512, val_fraction: float = 0.05, seed: int = 42,
                            source: str = "") -> dict:
    """Tokenise, shuffle, split and write the folder (atomically: nothing appears on an error)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_split_fraction must be in [0, 1), got {val_fraction}")
    if max_seq_length < 4:
        raise UserError(f"--max_seq_length must be at least 4, got {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = max(1, round(len(rows) * val_fraction)) if val_fraction > 0 and len(rows) > 1 else 0
    encoded = []
    for r in rows:
        pair = encode_pair(tokenizer, r, max_seq_length)
        # both cut to the same tokens: nothing left to prefer (e.g. the answers differ only past the cut)
        if not torch.equal(pair["chosen"], pair["rejected"]):
            encoded.append(pair)
    dropped = len(rows) - len(encoded)
    n_val = min(n_val, max(0, len(encoded) - 1))
    if not encoded:
        raise UserError(f"{source or 'the data'}: every pair is identical after truncation to {max_seq_length} tokens")
    meta = {"kind": KIND, "tokenizer": tokenizer_fingerprint(checkpoint_dir), "max_seq_length": max_seq_length,
            "longest": max(max(len(p["chosen"]), len(p["rejected"])) for p in encoded),
            "n_train": len(encoded) - n_val, "n_val": n_val, "dropped_identical_after_truncation": dropped,
            "source": str(source)}
    with atomic_dir(destination) as tmp:
        torch.save(encoded[n_val:], tmp / "train.pt")
        torch.save(encoded[:n_val], tmp / "val.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    note = f" ({dropped} pair(s) identical after truncation dropped)" if dropped else ""
    print(f"wrote {meta['n_train']} training and {n_val} validation pairs to {destination}{note}")
    return meta


def prepare_preferences(checkpoint_dir: Path, destination_path: Path, data_file_path: Optional[Path],
                        url: Optional[str], max_seq_length: int, val_fraction: float, seed: int) -> dict:
    """What scripts/prepare_preferences.py does: a local file, or `url` downloaded beside the destination."""
    from lit_llama.io.checkpoint import validate_checkpoint_dir

    validate_checkpoint_dir(checkpoint_dir)
    if data_file_path is None and not url:
        raise UserError("pass --data_file_path (a local JSON/JSONL file) or --url (one to download)")
    path = data_file_path or download(url, Path(destination_path).parent / url.rsplit("/", 1)[-1].split("?")[0])
    return prepare_preference_data(read_preference_file(path), checkpoint_dir, destination_path, max_seq_length,
                                   val_fraction, seed, source=str(path))


def load_preference_data(data_dir: Path, checkpoint_dir: Path,
                         block_size: Optional[int] = None) -> Tuple[list, list, dict]:
    """(train pairs, validation pairs, meta) of a prepared folder, checked against the tokenizer
    and, given `block_size`, the model's context."""
    data_dir = Path(data_dir)
    missing = [f for f in ("train.pt", "val.pt", "meta.json") if not (data_dir / f).is_file()]
    if missing:
        raise UserError(f"data directory {data_dir} lacks {', '.join(missing)} "
                        f"(run scripts/prepare_preferences.py first)")
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except json.JSONDecodeError:
        raise UserError(f"{data_dir / 'meta.json'} is not valid JSON")
    if meta.get("kind") != KIND:
        raise UserError(f"{data_dir} holds no preference pairs (prepare it with scripts/prepare_preferences.py)")
    if meta.get("tokenizer") != tokenizer_fingerprint(checkpoint_dir):
        raise UserError(f"{data_dir} was prepared with another tokenizer than {checkpoint_dir}'s; prepare it again")
    longest = meta.get("longest", meta.get("max_seq_length", 0))
    if block_size is not None and longest > block_size:
        raise UserError(f"{data_dir} holds sequences of {longest} tokens, above the model's context {block_size}: "
                        f"prepare it with --max_seq_length {block_size}")
    try:
        train = torch.load(data_dir / "train.pt", weights_only=True)
        val = torch.load(data_dir / "val.pt", weights_only=True)
    except Exception as e:
        raise UserError(f"{data_dir}: cannot read the prepared data ({str(e).splitlines()[0][:200]})")
    if not train:
        raise UserError(f"{data_dir} has no training pairs")
    return train, val, meta


def collate_pairs(pairs: list, pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """A micro-batch of B pairs as 2B right-padded rows, the B chosen then the B rejected:
    input_ids (2B, T), lengths (2B,) and prompt_lengths (2B,)."""
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    prompt_lengths = torch.tensor([int(p["prompt_length"]) for p in pairs] * 2, dtype=torch.long)
    return {"input_ids": ids, "lengths": lengths, "prompt_lengths": prompt_lengths}


def response_targets(batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for next-token log-probs of the answers only: targets are IGNORE_INDEX at
    the prompt and the padding."""
    ids = batch["input_ids"]
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    pos = torch.arange(1, ids.size(1), device=ids.device)[None, :]  # the position of each target token
    keep = (pos >= batch["prompt_lengths"][:, None]) & (pos < batch["lengths"][:, None])
    targets[~keep] = IGNORE_INDEX
    return inputs, targets


class PreferenceBatches(InstructionBatches):
    """Micro-batches of pairs as a pure function of the micro-step (seeded epochs, exact resume)."""

    def __call__(self, step: int) -> Dict[str, torch.Tensor]:
        n = len(self.examples)
        picks = [self.examples[self._order(k // n)[k % n]]
                 for k in range(step * self.micro_batch_size, (step + 1) * self.micro_batch_size)]
        return collate_pairs(picks, self.pad_id)


def maybe_quantize(model, quantize: Optional[str]):
    """The base's linear layers in bitsandbytes 4-bit for QLoRA (`quantize` "nf4"/"fp4"), or as they are."""
    if quantize is None:
        return model
    from lit_llama.quant.quantization import quantize_linears

    return quantize_linears(model, quantize)


def train_on_pairs(*, checkpoint_dir: Path, data_dir: Path, out_dir: Path, args, build, compute_loss, save_final,
                   precision: Optional[str] = None, devices: int = 1, resume: bool = False, seed: int = 1337) -> dict:
    """What finetune/reward_model.py and finetune/dpo.py share: check everything before any work,
    load the base (memory-mapped), `build(model)` the trainable model (LoRA, a head), train it with
    training.fit and `compute_loss`, then `save_final(fabric, model, out_dir)`."""
    from lit_llama.io.checkpoint import load_config, load_model, validate_checkpoint_dir
    from lit_llama.train.training import fit, launch, make_optimizer
    from lit_llama.utils import make_fabric

    validate_checkpoint_dir(checkpoint_dir)
    config = load_config(checkpoint_dir)
    train, val, meta = load_preference_data(data_dir, checkpoint_dir, config.block_size)
    if resume:
        from lit_llama.train.training import check_training_state, last_checkpoint

        check_training_state(last_checkpoint(out_dir))
    fabric = make_fabric(precision, devices)
    args.accumulation_steps(fabric.world_size)  # fail before any work if the batch sizes don't divide
    launch(fabric)
    fabric.seed_everything(seed)
    model = fabric.setup_module(build(load_model(checkpoint_dir, config)))
    optimizer = fabric.setup_optimizers(make_optimizer(model, args))
    pad = Tokenizer(checkpoint_dir).eos_id or 0
    train_batches = PreferenceBatches(train, args.micro_batch_size, seed=seed, pad_id=pad)
    val_batches = PreferenceBatches(val, args.micro_batch_size, seed=seed, pad_id=pad) if val else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fabric.print(f"{len(train)} training and {len(val)} validation pairs; {trainable:,} trainable parameters")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    result = fit(fabric, model, optimizer, train_batches, val_batches, args, out_dir, resume=resume,
                 trainable_only=True, compute_loss=compute_loss)
    if fabric.global_rank == 0:
        save_final(fabric, model, Path(out_dir))
    fabric.barrier()
    return result
