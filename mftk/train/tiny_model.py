"""The model and tokenizer: a local Hugging Face dir, or the built-in tiny Llama.

The tiny path needs no download: a byte-level BPE tokenizer is trained with `tokenizers` on the
task text, a small `LlamaConfig` is built in code, and an optional short base pretraining (plain
causal LM, all weights, on the training text or on model.pretrain.data's corpus: read_corpus)
teaches it the text. Tokenizer and pretrained base are cached in the cache dir under a hash of
everything they depend on; the result is always loaded back from the cache, so a first run and a
resumed run start from bit-identical weights.

What the keys hash, and so what makes two runs share a base: the tokenizer's key, the rendered
text of every task (train and held-out splits) and model.vocab_size; the base's key, the tokenizer
key, the LlamaConfig (model.tiny, data.seq_len), model.pretrain, train.seed and the text it is
pretrained on (the training split's records, or the corpus). No adapter setting (adapter.mode,
rank, router, match_params) nor loss, stage or optimizer setting goes in: the variants of a
comparison over the same tasks and seed get one base. A different task list does change it (a
classify task's rendered rows are text too), so compare runs over the same tasks. The info's
"base" ("base-<key>") names it; `mftk compare` refuses runs whose bases differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from mftk.train.checks import TINY_KEYS
from mftk.train.config import ConfigError, ModelConfig
from mftk.train.records import DataError

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE PreTrainedTokenizerFast trained on texts (bos <s>, eos </s>, pad <pad>)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_config(overrides: dict[str, Any] | None, vocab_size: int, max_positions: int, tokenizer):
    params = dict(TINY_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in TINY_KEYS:
            raise ConfigError(f"model.tiny.{key}: unknown key; expected one of {sorted(TINY_KEYS)}")
        params[key] = value
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **params,
    )


def read_corpus(files: list[str]) -> list[list[str]]:
    """A pretraining corpus as docs of one text segment each: a `.jsonl` file gives one doc per
    line ({"text": str}; blank lines skipped), any other file is one doc of its UTF-8 text.
    A malformed line raises DataError("file:line: reason"); an empty corpus, DataError too."""
    docs: list[list[str]] = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                if not path.lower().endswith(".jsonl"):
                    docs.append([f.read()])
                    continue
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{i}: not JSON ({err.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise DataError(f'{path}:{i}: expected an object with a "text" string')
                    docs.append([rec["text"]])
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise DataError(f"{path}: cannot read it ({err.strerror})") from None
    if not any(seg for doc in docs for seg in doc):
        raise DataError(f"model.pretrain.data: no text in {files}")
    return docs


def pretrain_base(
    model,
    tokenizer,
    docs: list[list[str]],
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    seed: int,
    log=print,
) -> list[float]:
    """Causal-LM training of all weights on docs, concatenated and cut into seq_len chunks.

    docs: each a list of text segments, tokenized one by one exactly like the fine-tuning samples
    (data.tokenize), so the base sees the same token boundaries (a BPE merge across a
    prompt/answer boundary would otherwise differ). An eos is added where a doc lacks one."""
    flat = [seg for doc in docs for seg in doc]
    seg_ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    k = 0
    for doc in docs:
        row = [t for seg in seg_ids[k : k + len(doc)] for t in seg]
        k += len(doc)
        ids.extend(
            row if row and row[-1] == tokenizer.eos_token_id else row + [tokenizer.eos_token_id]
        )
    n_chunks = len(ids) // seq_len
    if n_chunks == 0:
        raise DataError(
            f"model.pretrain: the pretraining text (model.pretrain.data's corpus, or the tasks' "
            f"training text) has {len(ids)} tokens, fewer than data.seq_len = {seq_len}"
        )
    chunks = torch.tensor(ids[: n_chunks * seq_len]).view(n_chunks, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps)
    )
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        batch = chunks[torch.randint(n_chunks, (batch_size,), generator=gen)]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(
                f"pretrain step {step + 1}/{steps}  loss {losses[-1]:.3f}  "
                f"({time.perf_counter() - t0:.1f}s)"
            )
    model.eval()
    return losses


def load_model_and_tokenizer(
    mcfg: ModelConfig,
    texts: list[str],
    pretrain_docs: list[list[str]],
    seq_len: int,
    seed: int,
    cache_dir: str,
    log=print,
):
    """(model, tokenizer, info). texts: all task text (tokenizer training); pretrain_docs: the
    base pretraining's docs as text segments (the training split's records, or read_corpus's
    corpus; see pretrain_base)."""
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between our log lines
    dtype = DTYPES[mcfg.dtype]
    if mcfg.path is not None:
        tok = AutoTokenizer.from_pretrained(mcfg.path)
        model = AutoModelForCausalLM.from_pretrained(
            mcfg.path, dtype=dtype, attn_implementation=mcfg.attn_implementation
        )
        return model, tok, {"source": mcfg.path}

    key = _hash({"texts": _hash(texts), "vocab": mcfg.vocab_size})
    tok_dir = os.path.join(cache_dir, f"tokenizer-{key}")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tok = train_tokenizer(texts, mcfg.vocab_size)
        _atomic_save(tok.save_pretrained, tok_dir)
        log(f"trained a {len(tok)}-token BPE tokenizer -> {tok_dir}")
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    config = tiny_config(mcfg.tiny, len(tok), seq_len, tok)
    pre = mcfg.pretrain
    mkey = _hash(
        {
            "tok": key,
            "config": config.to_dict(),
            "steps": pre.steps,
            "lr": pre.lr,
            "bs": pre.batch_size,
            "seq": seq_len,
            "seed": seed,
            "text": _hash(pretrain_docs) if pre.steps else None,
        }
    )
    base_dir = os.path.join(cache_dir, f"base-{mkey}")
    info: dict[str, Any] = {
        "source": "tiny",
        "cache": base_dir,
        "base": f"base-{mkey}",
        "tokenizer": f"tokenizer-{key}",
    }
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if pre.steps:
            t0 = time.perf_counter()
            losses = pretrain_base(
                model, tok, pretrain_docs, pre.steps, pre.lr, pre.batch_size, seq_len, seed, log
            )
            info["pretrain"] = {
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "seconds": time.perf_counter() - t0,
            }
            with open(os.path.join(cache_dir, f"pretrain-{mkey}.json"), "w") as f:
                json.dump(info["pretrain"], f)
        _atomic_save(model.save_pretrained, base_dir)
    else:
        path = os.path.join(cache_dir, f"pretrain-{mkey}.json")
        if os.path.isfile(path):
            with open(path) as f:
                info["pretrain"] = {**json.load(f), "cached": True}
    model = LlamaForCausalLM.from_pretrained(
        base_dir, dtype=dtype, attn_implementation=mcfg.attn_implementation
    )
    return model, tok, info


def _atomic_save(save, path: str) -> None:
    tmp = path + f".tmp{os.getpid()}"
    save(tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
