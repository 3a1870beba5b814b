"""Build the testbed model: tiny-gdn pretrained on the testbed corpus.

The architecture is the built-in `tiny-gdn` (Qwen3-Next: 3 Gated DeltaNet + 1 attention
layer, MoE, head_dim 64 so vLLM serves it); the tokenizer is a byte-level BPE trained on
the corpus's sentences, so a dialogue is about 25 tokens and a step is cheap. Training is
plain AdamW on every token of the dialogues, seeded, on the CPU, for a fixed number of
steps: the same code on the same machine writes the same weights.

`<|im_end|>` is the end-of-sequence token, so generation stops after one reply.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

from behaviorc.model.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_gdn_config
from behaviorc.model.testbed_corpus import Dialogue, chat_text, corpus, tokenizer_texts
from behaviorc.core.files import PROVENANCE_FILE

MODEL_NAME = "tiny-gdn-testbed"  # its built-in name
SEED = 0
VOCAB_SIZE = 512
STEPS = 500
BATCH = 32
PEAK_LR = 3e-3
WARMUP = 30
CORPUS_SIZE = STEPS * BATCH

Progress = Callable[[int, int, float], None]  # (step, steps, loss)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = tokenizer_texts() + ["user\n", "assistant\n"]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=[SPECIAL_TOKENS[1]])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_testbed(folder: Path, progress: Progress | None = None, steps: int = STEPS) -> None:
    """Write the testbed model's folder (config, weights, tokenizer, behaviorc.json)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    fields = {**tiny_gdn_config(len(tokenizer)), "eos_token_id": tokenizer.eos_token_id,
              "bos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(**fields)
    began = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: float sums then run in one order, so any machine with this torch
    # writes the same weights (and two threads fight badly on a busy machine).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            losses = pretrain(model, tokenizer, corpus(steps * BATCH, SEED), steps, progress)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    (folder / PROVENANCE_FILE).write_text(json.dumps({
        "builtin": MODEL_NAME, "seed": SEED, "steps": steps, "batch": BATCH,
        "peak_lr": PEAK_LR, "loss_first": losses[0], "loss_last": losses[-1],
        "seconds": round(time.perf_counter() - began, 1)}, indent=2) + "\n")


def pretrain(model, tokenizer, dialogues: list[Dialogue], steps: int,
             progress: Progress | None = None) -> list[float]:
    """AdamW over every token of the dialogues, `BATCH` per step, in corpus order."""
    import torch

    # Each dialogue follows the start token (EOS, as this tokenizer has no BOS), the way
    # training data and `general_nll` present a text, so a text's first token is learned.
    start = tokenizer.eos_token_id
    rows = [[start, *tokenizer(chat_text(d.user, d.assistant)).input_ids] for d in dialogues]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    model.train()
    losses = []
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    for step in range(steps):
        batch = [rows[order[(step * BATCH + i) % len(order)]] for i in range(BATCH)]
        ids, mask, labels = _right_padded(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    model.eval()
    return losses


def _learning_rate(step: int, steps: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(steps - WARMUP - 1, 1)
    return PEAK_LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _right_padded(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels
