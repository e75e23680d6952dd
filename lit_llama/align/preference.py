"""Preference data: (prompt, chosen, rejected) triples for reward modelling and DPO.

Three row forms are read from JSON or JSONL (optionally gzipped):

* ``{"prompt", "chosen", "rejected"}``: the prompt and the two answers, concatenated verbatim;
* StackExchange-paired's ``{"question", "response_j", "response_k"}`` (response_j is the better
  answer), rendered with StackLLaMA's template ``"Question: {question}\\n\\nAnswer: {answer}"``;
* Anthropic HH-RLHF's ``{"chosen", "rejected"}``, whole dialogues that share everything up to the
  last ``"\\n\\nAssistant:"``, which is the prompt.

A prepared folder holds ``train.pt`` and ``val.pt``, lists of ``{"chosen", "rejected",
"prompt_length"}`` (token ids of prompt + answer + EOS, and how many of the leading ids are the
prompt), and ``meta.json`` with the tokenizer's fingerprint, in lit_llama/data/records.py's format.
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from lit_llama.data.instruction import IGNORE_INDEX, InstructionBatches, download
from lit_llama.data.records import (check_val_fraction, load_prepared, read_records, save_prepared, shuffled,
                                    tokenizer_fingerprint, val_size)
from lit_llama.io.checkpoint import load_config, load_model, validate_checkpoint_dir
from lit_llama.quant.bnb import quantize_linears
from lit_llama.tokenizer import Tokenizer
from lit_llama.train.loop import TrainArgs
from lit_llama.train.setup import RunData, SaveFinal, run
from lit_llama.utils import UserError

STACKLLAMA_TEMPLATE = "Question: {question}\n\nAnswer: "
HH_ASSISTANT = "\n\nAssistant:"
KIND = "preferences"


def stackllama_prompt(question: str) -> str:
    return STACKLLAMA_TEMPLATE.format(question=question)


def read_preference_file(path: Path) -> List[Dict[str, str]]:
    """Rows of a JSON list or JSONL file (``.gz`` allowed) as {"prompt", "chosen", "rejected"}."""
    raw = read_records(path)
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
    check_val_fraction(val_fraction)
    if max_seq_length < 4:
        raise UserError(f"--max_seq_length must be at least 4, got {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    rows = shuffled(rows, seed)
    n_val = val_size(len(rows), val_fraction)
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
    meta = save_prepared(destination, encoded, n_val, {
        "kind": KIND, "tokenizer": tokenizer_fingerprint(checkpoint_dir), "max_seq_length": max_seq_length,
        "longest": max(max(len(p["chosen"]), len(p["rejected"])) for p in encoded),
        "dropped_identical_after_truncation": dropped, "source": str(source)})
    note = f" ({dropped} pair(s) identical after truncation dropped)" if dropped else ""
    print(f"wrote {meta['n_train']} training and {n_val} validation pairs to {destination}{note}")
    return meta


def prepare_preferences(checkpoint_dir: Path, destination_path: Path, data_file_path: Optional[Path],
                        url: Optional[str], max_seq_length: int, val_fraction: float, seed: int) -> dict:
    """What scripts/prepare_preferences.py does: a local file, or `url` downloaded beside the destination."""
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
    train, val, meta = load_prepared(data_dir, checkpoint_dir, KIND, "prepare it with scripts/prepare_preferences.py",
                                     "preference pairs")
    longest = meta.get("longest", meta.get("max_seq_length", 0))
    if block_size is not None and longest > block_size:
        raise UserError(f"{data_dir} holds sequences of {longest} tokens, above the model's context {block_size}: "
                        f"prepare it with --max_seq_length {block_size}")
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
    return model if quantize is None else quantize_linears(model, quantize)


def train_on_pairs(*, checkpoint_dir: Path, data_dir: Path, out_dir: Path, args: TrainArgs, build, compute_loss,
                   save_final: SaveFinal, precision: Optional[str] = None, devices: int = 1, resume: bool = False,
                   seed: int = 1337) -> dict:
    """What finetune/reward_model.py and finetune/dpo.py share: check the base and the pairs before
    any work, load the base (memory-mapped), `build(model)` the trainable model (LoRA, a head), and
    train it with train.setup.run and `compute_loss`, which ends with `save_final`."""
    validate_checkpoint_dir(checkpoint_dir)
    config = load_config(checkpoint_dir)
    train, val, meta = load_preference_data(data_dir, checkpoint_dir, config.block_size)
    pad = Tokenizer(checkpoint_dir).eos_id or 0

    def data(fabric, model) -> RunData:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fabric.print(f"{len(train)} training and {len(val)} validation pairs; {trainable:,} trainable parameters")
        return RunData(PreferenceBatches(train, args.micro_batch_size, seed=seed, pad_id=pad),
                       PreferenceBatches(val, args.micro_batch_size, seed=seed, pad_id=pad) if val else None)

    return run(out_dir=out_dir, args=args, build=lambda fabric: build(load_model(checkpoint_dir, config)), data=data,
               save_final=save_final, precision=precision, devices=devices, resume=resume, seed=seed,
               compute_loss=compute_loss)
