"""The sections of a behavior, checked: `steer`, `train` (with its mix, optimizer and
distillation) and `eval`. Each returns its IR node, or None after reporting why."""

from __future__ import annotations

import re

from behaviorc.core import ir
from behaviorc.core.diagnostics import DiagnosticSink, Location, did_you_mean
from behaviorc.core.vocabulary import (CONTEXT_MODES, FINAL_NORM_READINGS, LR_SCHEDULES,
                                       OBJECTIVES, OPTIMIZERS, ORIENTATIONS, READ_POSITIONS,
                                       STEER_POSITIONS,
                                       SCORE_KINDS, STEER_METHODS, TEACHERS)
from behaviorc.lang import ast
from behaviorc.lang.data import DataFiles, read_example, read_pair, read_prompt, read_text
from behaviorc.lang.values import (MAX_BATCH, MAX_RANK, MAX_SEED, MAX_STEPS, MAX_STRENGTH, Block,
                                   Values, values_of)
from behaviorc.core.metrics import EXPECTABLE, STEER_EXPECTABLE, TRAIN, reply_table


PAIR_LINE = '{"prompt", "positive", "negative"}'
EXAMPLE_LINE = '{"context", "response"} or {"messages": [{"role", "content"}, ...]}'
TEXT_LINE = '{"text"}'
PROMPT_LINE = '{"prompt"}'


class Sections:
    def __init__(self, sink: DiagnosticSink, data: DataFiles, values: Values,
                 syntax_errors: list[Location]) -> None:
        self.sink, self.data, self.values = sink, data, values
        self.syntax_errors = syntax_errors

    def _missing(self, node: ast.Located, message: str, loc: Location, hint: str) -> None:
        """Report that `node` lacks something, unless a syntax error inside it (an
        unknown setting, skipped) already explains why."""
        if not any(node.encloses(error) for error in self.syntax_errors):
            self.sink.error(message, loc, hint)

    def steer(self, section: ast.Setting, base: str, model: ir.ModelDecl | None) -> ir.Steer | None:
        block = Block(section.block, "steer", self.sink, repeatable=("pair", "pairs"))
        errors = len(self.sink.errors)
        layers = self._layers(block.one("layers"), model)
        method = self.values.choice(block.one("method"), STEER_METHODS, "method") or "mean_diff"
        read = self.values.choice(block.one("read"), READ_POSITIONS, "read position") or "mean"
        orient = self.values.choice(block.one("orient"), ORIENTATIONS, "orientation") or "mean"
        final_norm = (self.values.choice(block.one("final_norm"), FINAL_NORM_READINGS,
                                         "final_norm reading") or "before")
        positions = (self.values.choice(block.one("positions"), STEER_POSITIONS,
                                        "steered positions") or "all")
        strength = self._strength(block.one("strength"))
        if isinstance(strength, float) and strength > 20:
            self.sink.warning(f"strength {strength:g} is very strong: steered text often stops "
                              "making sense above 20", block.one("strength").values[0].loc,
                              "check it with `sweep`, e.g. `sweep 2, 4, 8, 16`")
        sweep = tuple(self.values.number_at(v, "sweep", low=-MAX_STRENGTH, high=MAX_STRENGTH)
                      for v in values_of(block.one("sweep")))
        pairs, sources = self._pairs(block, base)
        if not block.all("pair") and not block.all("pairs"):
            self._missing(section, "steer has no pairs", section.key_loc,
                          'add `pair "prompt" { positive "..." negative "..." }` '
                          'or `pairs "file.jsonl"`')
        elif method != "mean_diff" and 0 < len(pairs) < 2:
            self.sink.error(f"`method {method}` needs at least 2 pairs", block.one("method").values[0].loc)
        if strength == "auto" and sweep and None not in sweep and max(sweep) <= 0:
            self.sink.error("`strength auto` chooses from the sweep, which has no positive strength",
                            block.one("sweep").values[0].loc, "e.g. `sweep 1, 2, 4, 8`")
        budget = self._budget(block.one("budget"))
        if len(self.sink.errors) > errors or strength is None or budget is None:
            return None
        return ir.Steer(layers=layers, method=method, strength=strength, read=read,
                        orient=orient, final_norm=final_norm, positions=positions,
                        pairs=tuple(pairs), sources=tuple(sources),
                        sweep=tuple(s for s in sweep if s is not None), **budget, loc=section.loc)

    def _strength(self, setting: ast.Setting | None) -> float | str | None:
        if setting is not None and isinstance(setting.values[0], ast.Word):
            return self.values.choice(setting, ("auto",), "strength")
        return self.values.number(setting, low=0, low_open=True, high=MAX_STRENGTH,
                                  default=ir.Steer.model_fields["strength"].default)

    def _budget(self, setting: ast.Setting | None) -> dict[str, float] | None:
        defaults = ir.Steer(layers="auto", pairs=())
        if setting is None:
            return {}
        block = Block(setting.block, "budget", self.sink)
        nll = self.values.number(block.one("nll"), low=0, percent=True, default=defaults.nll_budget)
        if block.one("nll") and nll is not None and not block.one("nll").values[0].percent:
            self.sink.error("write the NLL budget as a percentage", block.one("nll").values[0].loc,
                            f"e.g. `nll {nll * 100:g}%`: general NLL may rise that much")
            nll = None
        repetition = self.values.number(block.one("repetition"), low=0, high=1,
                                        default=defaults.repetition_budget)
        if nll is None or repetition is None:
            return None
        return {"nll_budget": nll, "repetition_budget": repetition}

    def _layers(self, setting: ast.Setting | None, model: ir.ModelDecl | None):
        if setting is None:
            return "auto"
        first = setting.values[0]
        if isinstance(first, ast.Word):
            return self.values.choice(setting, ("auto",), "layer choice") or "auto"
        layers: list[int] = []
        count = model.num_layers if model else None
        for span in setting.values:
            ends = [self._layer_number(span.start)] + \
                ([self._layer_number(span.end)] if span.end else [])
            if None in ends:
                continue
            start, end = ends[0], ends[-1]
            if end < start:
                self.sink.error(f"empty layer range {start}..{end}", span.loc,
                                f"write the lower layer first: {end}..{start}")
                continue
            if count is not None and end >= count:
                self.sink.error(f"layer {end} does not exist: `{model.name}` has {count} layers "
                                f"(0..{count - 1})", span.loc, "layers are numbered from 0")
                continue
            again = sorted(set(layers) & set(range(start, end + 1)))
            if again:
                self.sink.error(f"layer {again[0]} is listed twice", span.loc,
                                "steering adds once per layer; list each layer once")
                continue
            layers.extend(range(start, end + 1))
        return tuple(sorted(set(layers)))

    def _layer_number(self, num: ast.Num) -> int | None:
        value = num.value
        if num.negative or num.percent or not value.is_integer():
            self.sink.error(f"a layer is a whole number from 0, not {num.source}", num.loc)
            return None
        return int(value)

    def _pairs(self, block: Block, base: str) -> tuple[list[ir.Pair], list[ir.DataFile]]:
        pairs: list[ir.Pair] = []
        for setting in block.all("pair"):
            pair = self._inline_pair(setting)
            if pair:
                pairs.append(pair)
        sources = []
        for setting in block.all("pairs"):
            loaded = self.data.load(setting.values[0], base, read_pair, PAIR_LINE)
            if loaded:
                pairs.extend(loaded.records)
                sources.append(loaded.source)
        return pairs, sources

    def _inline_pair(self, setting: ast.Setting) -> ir.Pair | None:
        prompt = setting.values[0]
        inner = Block(setting.block, "pair", self.sink)
        texts: dict[str, ast.Str] = {"prompt": prompt}
        for side in ("positive", "negative"):
            found = inner.one(side)
            if found is None:
                self._missing(setting, f"pair is missing `{side}`", setting.key_loc,
                              f'add `{side} "..."` inside the braces')
                return None
            texts[side] = found.values[0]
        for field, text in texts.items():
            if not text.value.strip():
                self.sink.error(f"the pair's {field} is empty", text.loc)
                return None
        if texts["positive"].value == texts["negative"].value:
            self.sink.error("`positive` and `negative` are the same text: the pair contrasts nothing",
                            texts["negative"].loc, "the negative is the completion to steer away from")
            return None
        return ir.Pair(prompt=prompt.value, positive=texts["positive"].value,
                       negative=texts["negative"].value)

    def train(self, section: ast.Setting, base: str, steers: bool) -> ir.Train | None:
        block = Block(section.block, "train", self.sink, repeatable=("example", "examples"))
        errors = len(self.sink.errors)
        examples: list[ir.Example] = []
        sources: list[ir.DataFile] = []
        for setting in block.all("example"):
            response = Block(setting.block, "example", self.sink).one("response")
            if response is None:
                self._missing(setting, "example is missing `response`", setting.key_loc,
                              'add `response "..."` inside the braces')
            elif not response.values[0].value.strip():
                self.sink.error("the example's response is empty", response.values[0].loc)
            else:
                examples.append(ir.Example(context=setting.values[0].value,
                                           response=response.values[0].value))
        for setting in block.all("examples"):
            loaded = self.data.load(setting.values[0], base, read_example, EXAMPLE_LINE)
            if loaded:
                examples.extend(loaded.records)
                sources.append(loaded.source)
        distill = self._distill(block.one("distill"), base, steers)
        if not block.all("example") and not block.all("examples") and not block.one("distill"):
            self._missing(section, "train has no examples", section.key_loc,
                          'add `examples "file.jsonl"`, `example "context" { response "..." }` '
                          "or `distill steering { ... }`")
        defaults = ir.Train()
        lr = self.values.number(block.one("lr"), low=0, high=1, low_open=True, default=defaults.lr)
        if lr is not None and lr > 1e-3:
            self.sink.warning(f"lr {block.one('lr').values[0].source} is high for fine-tuning",
                              block.one("lr").values[0].loc, "fine-tuning usually uses 1e-5 .. 1e-4")
        train = dict(
            examples=tuple(examples), sources=tuple(sources), distill=distill,
            mix=self._mix(block.one("mix"), base),
            lr=lr,
            steps=self.values.number(block.one("steps"), low=1, high=MAX_STEPS, whole=True,
                                     default=defaults.steps),
            batch=self.values.number(block.one("batch"), low=1, high=MAX_BATCH, whole=True,
                                     default=defaults.batch),
            warmup=self.values.number(block.one("warmup"), low=0, whole=True, default=defaults.warmup),
            schedule=self.values.choice(block.one("schedule"), LR_SCHEDULES, "schedule"),
            clip=self.values.number(block.one("clip"), low=0, default=defaults.clip),
            seed=self.values.number(block.one("seed"), low=0, high=MAX_SEED, whole=True,
                                    default=defaults.seed),
            context=self.values.choice(block.one("context"), CONTEXT_MODES, "context mode"),
            targets=self.values.groups(block.one("targets")),
            optimizer=self._optimizer(block.one("optimizer")),
        )
        warmup, steps = block.one("warmup"), train["steps"]
        if warmup and train["warmup"] is not None and steps is not None and train["warmup"] > steps:
            self.sink.error(f"warmup ({train['warmup']}) is longer than training ({steps} steps)",
                            warmup.values[0].loc)
        if len(self.sink.errors) > errors:
            return None
        return ir.Train(**{k: v for k, v in train.items() if v is not None}, loc=section.loc)

    def _mix(self, setting: ast.Setting | None, base: str) -> ir.Mix | None:
        if setting is None:
            return None
        kind, ratio, file = (setting.values if len(setting.values) == 3 else (None, *setting.values))
        if kind is not None and kind.name != "general":
            self.sink.error(f"unknown mix `{kind.name}`", kind.loc,
                            did_you_mean(kind.name, ["general"]) or "the mix is `general` data")
        value = self.values.number_at(ratio, "mix", low=0, high=1, low_open=True, high_open=True,
                                percent=True)
        if value is not None and not ratio.percent:
            self.sink.error("write the mix as a percentage", ratio.loc,
                            f"e.g. `mix general {value * 100:g}%`")
            return None
        if value is not None and value > 0.5:
            self.sink.warning(f"a {ratio.source} general mix leaves less than half of training "
                              "for the behavior", ratio.loc, "25% is the usual share")
        loaded = self.data.load(file, base, read_text, TEXT_LINE)
        anchor = self.values.choice(Block(setting.block, "mix", self.sink).one("anchor"),
                                    OBJECTIVES, "anchor") if setting.block else "sft"
        if value is None or loaded is None or anchor is None:
            return None
        return ir.Mix(ratio=value, texts=loaded.records, source=loaded.source, anchor=anchor,
                      loc=setting.loc)

    def _optimizer(self, setting: ast.Setting | None) -> ir.Optimizer | None:
        if setting is None:
            return None
        name = self.values.choice(setting, OPTIMIZERS, "optimizer")
        block = Block(setting.block, "optimizer", self.sink)
        defaults = ir.Optimizer()
        scale_setting = block.one("scale")
        scale = None
        if scale_setting and isinstance(scale_setting.values[0], ast.Word):
            self.values.choice(scale_setting, ("auto",), "scale")
        elif scale_setting:
            scale = self.values.number(scale_setting, low=0, low_open=True)
        betas = defaults.betas
        if block.one("betas"):
            found = [self.values.number_at(v, "betas", low=0, high=1, high_open=True)
                     for v in block.one("betas").values]
            betas = tuple(found) if None not in found else None
        options = dict(
            name=name,
            rank=self.values.number(block.one("rank"), low=1, high=MAX_RANK, whole=True,
                                    default=defaults.rank),
            refresh=self.values.number(block.one("refresh"), low=1, high=MAX_STEPS, whole=True,
                                       default=defaults.refresh),
            limiter=self.values.number(block.one("limiter"), low=1, default=defaults.limiter),
            weight_decay=self.values.number(block.one("weight_decay"), low=0,
                                      default=defaults.weight_decay),
            betas=betas,
        )
        if None in options.values():
            return None
        return ir.Optimizer(**options, scale=scale)

    def _teachers(self, setting: ast.Setting, steers: bool) -> tuple[bool, str | None] | None:
        """(steered, system prompt) of `distill steering`, `distill prompt "..."` or both
        (`steering + prompt "..."`); None after reporting why not."""
        errors = len(self.sink.errors)
        teachers: dict[str, tuple[ast.Word, ast.Str | None]] = {}
        for value in setting.values:
            if isinstance(value, ast.Word):
                if value.name not in TEACHERS:
                    self.sink.error(f"cannot distill from `{value.name}`", value.loc,
                                    did_you_mean(value.name, TEACHERS) or
                                    'the teachers are `steering` (the behavior\'s steering) and '
                                    '`prompt "..."` (the base model with that system prompt)')
                elif value.name in teachers:
                    self.sink.error(f"`{value.name}` is named twice as a teacher", value.loc)
                teachers[value.name] = (value, None)
            else:  # a teacher's text
                word, _ = list(teachers.values())[-1]
                if word.name == "prompt":
                    teachers["prompt"] = (word, value)
                else:
                    self.sink.error(f"`{word.name}` takes no text", value.loc,
                                    'a system prompt goes with `prompt`: `distill steering + prompt "..."`')
        if "steering" in teachers and not steers:
            self.sink.error("`distill steering` needs a steer section in the same behavior",
                            teachers["steering"][0].loc, "add `steer { ... }` with the pairs to steer by")
        system = None
        if "prompt" in teachers:
            word, text = teachers["prompt"]
            if text is None:
                self.sink.error("a prompt teacher needs its system prompt", word.loc,
                                'write `distill prompt "You are ..."`: the teacher reads it, the student does not')
            elif not text.value.strip():
                self.sink.error("the teacher's system prompt is empty", text.loc,
                                "write what the prompted teacher is told, e.g. \"You are cheerful.\"")
            else:
                system = text.value
        if len(self.sink.errors) > errors:
            return None
        return "steering" in teachers, system

    def _objective(self, setting: ast.Setting | None) -> ir.Objective | None:
        defaults = ir.Objective()
        if setting is None:
            return defaults
        name = self.values.choice(setting, OBJECTIVES, "objective")
        block = Block(setting.block, "objective", self.sink)
        if name == "sft" and setting.block:
            self.sink.warning("`objective sft` trains on the samples' tokens: its settings are "
                              "kl's and are ignored", setting.block[0].loc, "drop them, or write `objective kl`")
        top_k_setting = block.one("top_k")
        top_k = defaults.top_k
        if top_k_setting and isinstance(top_k_setting.values[0], ast.Word):
            top_k = 0 if self.values.choice(top_k_setting, ("all",), "top_k") else None
        elif top_k_setting and top_k_setting.values[0].value < 1:
            top_k = None
            self.sink.error(f"`top_k` must be at least 1, not {top_k_setting.values[0].source}",
                            top_k_setting.values[0].loc, "`top_k all` keeps the whole vocabulary")
        elif top_k_setting:
            top_k = self.values.number(top_k_setting, low=1, whole=True)
        options = dict(
            name=name, top_k=top_k,
            temperature=self.values.number(block.one("temperature"), low=0, low_open=True,
                                           default=defaults.temperature),
            plain=self.values.number(block.one("plain"), low=0, default=defaults.plain),
            general=self._general_weight(block.one("general"), defaults.general),
            no_repeat=self._no_repeat(block.one("no_repeat"), defaults.no_repeat))
        if None in options.values():
            return None
        return ir.Objective(**options)

    def _general_weight(self, setting: ast.Setting | None, default: float) -> float | None:
        if setting is not None and not isinstance(setting.values[0], ast.Num):
            self.sink.error("`general` in `objective kl` is a weight", setting.values[0].loc,
                            "write e.g. `general 1`: the steered teacher's distribution on built-in "
                            "general texts, beside the samples")
            return None
        return self.values.number(setting, low=0, default=default)

    def _no_repeat(self, setting: ast.Setting | None, default: int) -> int | None:
        if setting is not None and setting.values[0].value < 2:
            self.sink.error(f"`no_repeat` is the length of the n-grams a reply may not repeat, at "
                            f"least 2, not {setting.values[0].source}", setting.values[0].loc,
                            "write e.g. `no_repeat 3`: no 3-gram of a reply twice (a single repeated "
                            "token is most often a word like \"the\")")
            return None
        return self.values.number(setting, low=2, whole=True, default=default)

    def _distill(self, setting: ast.Setting | None, base: str, steers: bool) -> ir.Distill | None:
        if setting is None:
            return None
        teachers = self._teachers(setting, steers)
        block = Block(setting.block, "distill", self.sink, repeatable=("prompt",))
        prompts, data_file = self._prompts(block, base)
        if not block.one("prompts") and not block.all("prompt"):
            self._missing(setting, "distill has no prompts", setting.key_loc,
                          'add `prompts "file.jsonl"` or `prompt "..."` inside its braces')
        defaults = ir.Distill(prompts=())
        samples = self.values.number(block.one("samples"), low=1, whole=True, default=defaults.samples)
        keep = self.values.number(block.one("keep"), low=1, whole=True, default=defaults.keep)
        if samples is not None and keep is not None and keep > samples:
            self.sink.error(f"cannot keep {keep} of {samples} samples",
                            (block.one("keep") or setting).loc, "keep at most `samples`")
        options = dict(
            samples=samples, keep=keep,
            temperature=self.values.number(block.one("temperature"), low=0,
                                     default=defaults.temperature),
            max_tokens=self.values.number(block.one("max_tokens"), low=1, whole=True,
                                    default=defaults.max_tokens),
            match_activations=self.values.number(block.one("match_activations"), low=0,
                                           default=defaults.match_activations),
        )
        objective_setting = block.one("objective")
        objective = self._objective(objective_setting)
        matching = block.one("match_activations")
        if teachers is not None and not teachers[0] and matching is not None:
            self.sink.error("`match_activations` pulls the hidden states toward the steered model's: "
                            "a prompt teacher has none", matching.key_loc,
                            "drop it, or distill `steering + prompt \"...\"`")
        if teachers is not None and not teachers[0] and objective is not None and objective.general > 0:
            self.sink.error("`general` teaches the steered model's distribution on general texts: "
                            "a prompt teacher has no steering", objective_setting.key_loc,
                            "drop it, or distill `steering + prompt \"...\"`")
        if None in options.values() or not prompts or teachers is None or objective is None:
            return None
        return ir.Distill(prompts=tuple(prompts), source=data_file, steering=teachers[0],
                          system=teachers[1], objective=objective, loc=setting.loc, **options)

    def _prompts(self, block: Block, base: str) -> tuple[list[str], ir.DataFile | None]:
        """A block's `prompt "..."` lines, then its `prompts "file.jsonl"`."""
        prompts: list[str] = []
        for inline in block.all("prompt"):
            if inline.values[0].value.strip():
                prompts.append(inline.values[0].value)
            else:
                self.sink.error("the prompt is empty", inline.values[0].loc)
        data_file = None
        if block.one("prompts"):
            loaded = self.data.load(block.one("prompts").values[0], base, read_prompt, PROMPT_LINE)
            if loaded:
                prompts.extend(loaded.records)
                data_file = loaded.source
        return prompts, data_file

    def eval(self, section: ast.Setting, base: str, behavior: str,
             steers: bool, trains: bool) -> ir.Eval | None:
        block = Block(section.block, "eval", self.sink,
                       repeatable=("pair", "pairs", "general", "expect", "prompt"))
        errors = len(self.sink.errors)
        pairs, sources = self._pairs(block, base)
        replies = self._reply_table(block, base, steers, bool(pairs))
        if replies and replies.get("source"):
            sources.append(replies["source"])
        general: list[str] = []
        for setting in block.all("general"):
            if not isinstance(setting.values[0], ast.Str):
                self.sink.error("`general` in an eval section names a file of texts",
                                setting.values[0].loc, 'write `general "data/general.jsonl"`: '
                                "the texts the general NLL is measured on")
                continue
            loaded = self.data.load(setting.values[0], base, read_text, TEXT_LINE)
            if loaded:
                general.extend(loaded.records)
                sources.append(loaded.source)
        reported = set(STEER_EXPECTABLE if steers else ()) | set(TRAIN if trains else ())
        if replies and replies.get("score"):
            models = ("base", "prompted" if replies.get("system") else "", "steered" if steers else "",
                      "trained" if trains else "")
            reported |= set(reply_table(tuple(m for m in models if m)))
        if not reported:
            self.sink.warning("nothing measures this eval: the behavior has no steer or train "
                              "section", section.key_loc)
        expects = []
        for setting in block.all("expect"):
            metric, op, value = setting.values
            if metric.name not in EXPECTABLE:
                self.sink.error(f"unknown metric `{metric.name}`", metric.loc,
                                did_you_mean(metric.name, EXPECTABLE) or
                                f"metrics: {', '.join(EXPECTABLE)}")
                continue
            if reported and metric.name not in reported:
                self.sink.error(f"`{behavior}` does not report `{metric.name}`", metric.loc,
                                f"it reports {', '.join(sorted(reported))}")
                continue
            number = self.values.number_at(value, "expect")
            if number is not None:
                expects.append(ir.Expectation(metric=metric.name, op=op.text, value=number,
                                              loc=setting.loc))
        if len(self.sink.errors) > errors or replies is None:
            return None
        return ir.Eval(pairs=tuple(pairs), sources=tuple(sources), general=tuple(general),
                       expect=tuple(expects), loc=section.loc,
                       **{k: v for k, v in replies.items() if k != "source"})

    def _reply_table(self, block: Block, base: str, steers: bool, has_pairs: bool) -> dict | None:
        """The reply table's settings of an eval block, as ir.Eval fields; None after an error."""
        errors = len(self.sink.errors)
        score_s = block.one("score")
        prompts, source = self._prompts(block, base)
        system = block.one("system")
        if system is not None and not system.values[0].value.strip():
            self.sink.error("the system prompt is empty", system.values[0].loc,
                            'e.g. `system "You are a cheerful assistant."`')
        defaults = ir.Eval()
        fields = dict(
            prompts=tuple(prompts),
            system=system.values[0].value if system else None,
            score=self._score(score_s, steers) if score_s else None,
            samples=self.values.number(block.one("samples"), low=0, high=16, whole=True,
                                       default=defaults.samples),
            max_tokens=self.values.number(block.one("max_tokens"), low=1, high=512, whole=True,
                                          default=defaults.max_tokens))
        given = [s for key in ("prompts", "prompt", "system", "samples", "max_tokens")
                 for s in block.all(key)]
        if given and score_s is None:
            self.sink.error(f"`{given[0].key}` is for the reply table, which needs a `score`",
                            given[0].key_loc, 'add `score markers "regex"`, `score projection` '
                                              'or `score judge "URL" { model "M"  rubric "..." }`')
        elif score_s is not None and not prompts and not has_pairs and not steers:
            self.sink.error("the reply table has no prompts to answer", score_s.key_loc,
                            'add `prompts "file.jsonl"` ({"prompt"} lines) or `prompt "..."`')
        if len(self.sink.errors) > errors:
            return None
        return {**fields, "source": source}

    def _score(self, setting: ast.Setting, steers: bool) -> ir.Score | None:
        kind = self.values.choice_word(setting.values[0], SCORE_KINDS, "scorer")
        strings: list[ast.Str] = list(setting.values[1:])
        if kind != "judge" and setting.block is not None:
            self.sink.error(f"`score {kind}` takes no block", setting.key_loc,
                            "only `score judge \"URL\" { ... }` has settings")
            return None
        if kind == "markers":
            return self._markers(setting, strings)
        if kind == "projection":
            if strings:
                self.sink.error("`score projection` takes no text", strings[0].loc,
                                "it projects replies on the behavior's own steering direction")
            elif not steers:
                self.sink.error("`score projection` needs a steer section: replies are projected "
                                "on the steering direction", setting.key_loc,
                                'score with `markers "regex"` or a `judge` instead')
            else:
                return ir.Score(kind="projection", loc=setting.loc)
            return None
        if kind == "judge":
            return self._judge(setting, strings)
        return None

    def _markers(self, setting: ast.Setting, strings: list[ast.Str]) -> ir.Score | None:
        if not strings:
            self.sink.error("`score markers` needs a pattern or words", setting.key_loc,
                            'e.g. `score markers "glad|happy|great"` (a regular expression) or '
                            '`score markers "glad", "happy", "great"` (whole words)')
            return None
        for text in strings:
            if not text.value.strip():
                self.sink.error("the marker is empty", text.loc)
                return None
        if len(strings) > 1:
            return ir.Score(kind="markers", words=tuple(t.value for t in strings), loc=setting.loc)
        try:
            re.compile(strings[0].value)
        except re.error as err:
            self.sink.error(f"the marker pattern is not a regular expression: {err}", strings[0].loc,
                            "escape special characters with a backslash, or list whole words: "
                            '`score markers "glad", "happy"`')
            return None
        return ir.Score(kind="markers", pattern=strings[0].value, loc=setting.loc)

    def _judge(self, setting: ast.Setting, strings: list[ast.Str]) -> ir.Score | None:
        if len(strings) != 1:
            self.sink.error("`score judge` takes one server URL", setting.key_loc,
                            'e.g. `score judge "http://127.0.0.1:8000" { model "M"  rubric "..." }`')
            return None
        url = strings[0]
        if not url.value.startswith(("http://", "https://")):
            self.sink.error(f"`{url.value}` is not an http(s) URL", url.loc,
                            'e.g. "http://127.0.0.1:8000", an OpenAI-compatible server')
            return None
        block = Block(setting.block, "judge", self.sink)
        found: dict[str, str] = {}
        for key, example in (("model", 'model "Qwen/Qwen3-0.6B"'),
                             ("rubric", 'rubric "How cheerful the reply sounds."')):
            value = block.one(key)
            if value is None:
                self._missing(setting, f"the judge has no `{key}`", setting.key_loc,
                              f"add `{example}` inside its braces")
            elif not value.values[0].value.strip():
                self.sink.error(f"the judge's {key} is empty", value.values[0].loc)
            else:
                found[key] = value.values[0].value
        guided = self.values.switch(block.one("guided"), True)
        timeout = self.values.number(block.one("timeout"), low=0, low_open=True)
        if len(found) < 2 or guided is None or (block.one("timeout") and timeout is None):
            return None
        judge = ir.Judge(url=url.value, model=found["model"], rubric=found["rubric"], guided=guided,
                         timeout=timeout, loc=setting.loc)
        return ir.Score(kind="judge", judge=judge, loc=setting.loc)

    # ---- compositions
