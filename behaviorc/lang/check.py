"""Syntax tree -> `ir.Spec`: every semantic check, every error of every file in one run.

The checker is the only producer of the IR. It loads the spec and its imports, resolves
names, checks values against their ranges, reads the data files the spec names and
decides where each model comes from. Everything is reported through one
DiagnosticSink; a spec with any error yields no IR.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from behaviorc import ir
from behaviorc.diagnostics import (BehaviorError, Diagnostic, DiagnosticSink, Location,
                                   did_you_mean)
from behaviorc.lang import ast
from behaviorc.lang.data import (DataFiles, read_example, read_pair, read_prompt, read_text,
                                  resolve_path)
from behaviorc.lang.linear import canonical_text, linearize
from behaviorc.lang.models import file_sha256, read_model_folder, resolve_model_source
from behaviorc.lang.parse import parse_text
from behaviorc.plan.plan import REPORTED_METRICS

STEER_METRICS = REPORTED_METRICS["steer.verify"]
TRAIN_METRICS = REPORTED_METRICS["train"]
DEPLOY_METRICS = REPORTED_METRICS["deploy"]
KNOWN_METRICS = tuple(dict.fromkeys(STEER_METRICS + TRAIN_METRICS + DEPLOY_METRICS))

PAIR_LINE = '{"prompt", "positive", "negative"}'
EXAMPLE_LINE = '{"context", "response"} or {"messages": [{"role", "content"}, ...]}'
TEXT_LINE = '{"text"}'
PROMPT_LINE = '{"prompt"}'

SWITCHES = {"on": True, "off": False, "true": True, "false": False}


def check_file(path: str) -> tuple[ir.Spec | None, list[Diagnostic]]:
    """The checked spec (None when it has errors) and every diagnostic, warnings too.
    Raises BehaviorError only when the spec file itself cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise BehaviorError(f"cannot read spec `{path}`: {getattr(err, 'strerror', None) or err}")
    return check_text(text, path)


def check_text(text: str, path: str) -> tuple[ir.Spec | None, list[Diagnostic]]:
    """Check spec `text` as if it were the file at `path` (imports and data files are
    resolved relative to its folder)."""
    sink = DiagnosticSink()
    # A large spec allocates hundreds of thousands of small acyclic objects (tokens,
    # nodes, IR); the cycle collector would rescan them over and over for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        spec = _Checker(sink).check(text, path)
    finally:
        if collecting:
            gc.enable()
    diagnostics = sorted(sink.items, key=_order)
    return (spec if not sink.errors else None), diagnostics


def load_spec(path: str) -> ir.Spec:
    """The checked spec; raises BehaviorError with every diagnostic when it has errors.
    Warnings are dropped here: use `check_file` to show them."""
    spec, diagnostics = check_file(path)
    if spec is None:
        raise BehaviorError("the spec has errors", diagnostics=[d for d in diagnostics])
    return spec


def _order(d: Diagnostic) -> tuple:
    loc = d.loc
    return (loc.file, loc.line, loc.column) if loc else ("", 0, 0)


@dataclass(frozen=True)
class _Facts:
    """What later declarations need to know about a behavior, read from its syntax so
    that an error inside the behavior does not hide errors about its uses."""

    model: str | None
    steers: bool
    trains: bool
    external: str | None  # "model" | "task_vector"

    @property
    def has_weights(self) -> bool:
        return self.trains or self.external is not None


class _Block:
    """The settings of one `{ ... }` block by key; a key given twice is an error unless
    it may repeat (`pair`, `expect`, ...)."""

    def __init__(self, settings: tuple[ast.Setting, ...] | None, where: str,
                 sink: DiagnosticSink, repeatable: tuple[str, ...] = ()) -> None:
        self.by_key: dict[str, list[ast.Setting]] = {}
        for setting in settings or ():
            self.by_key.setdefault(setting.key, []).append(setting)
        for key, found in self.by_key.items():
            if key not in repeatable:
                for extra in found[1:]:
                    sink.error(f"`{key}` is set twice in `{where}`", extra.key_loc,
                               f"first set on line {found[0].loc.line}; keep one")

    def one(self, key: str) -> ast.Setting | None:
        found = self.by_key.get(key)
        return found[0] if found else None

    def all(self, key: str) -> list[ast.Setting]:
        return self.by_key.get(key, [])


class _Checker:
    def __init__(self, sink: DiagnosticSink) -> None:
        self.sink = sink
        self.data = DataFiles(sink)
        self.files: list[ast.SourceFile] = []
        self.loaded: set[str] = set()
        self.syntax_ok = True
        self.models: dict[str, ir.ModelDecl] = {}
        self.model_decls: dict[str, ast.ModelDecl] = {}
        self.entities: dict[str, ast.BehaviorDecl | ast.ComposeDecl] = {}
        self.facts: dict[str, _Facts] = {}

    # ---- files and imports

    def check(self, text: str, path: str) -> ir.Spec | None:
        self._load(text, path, ())
        if not self.syntax_ok:
            return None
        main = self.files[-1]
        for file in self.files:
            self._declare(file)
        models = tuple(m for name in self.model_decls if (m := self._model(name)) is not None)
        for name, decl in self.entities.items():
            if isinstance(decl, ast.BehaviorDecl):
                self.facts[name] = self._facts(decl)
        behaviors, compositions = [], []
        for decl in self.entities.values():
            if isinstance(decl, ast.BehaviorDecl):
                behaviors.append(self._behavior(decl))
            else:
                compositions.append(self._compose(decl))
        deploys = [self._deploy(d) for d in main.items if isinstance(d, ast.DeployDecl)]
        for file in self.files[:-1]:
            for item in file.items:
                if isinstance(item, ast.DeployDecl):
                    self.sink.warning("a deploy in an imported file is ignored", item.loc,
                                      "deploy from the spec you build")
        if self.sink.errors:
            return None
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(f"{len(file.text)}\0".encode() + file.text.encode())
        return ir.Spec(path=os.path.abspath(path), sha256=digest.hexdigest(), models=models,
                       behaviors=tuple(behaviors), compositions=tuple(compositions),
                       deploys=tuple(deploys))

    def _load(self, text: str, path: str, stack: tuple[str, ...]) -> None:
        result = parse_text(text, path)
        self.sink.items.extend(result.diagnostics)
        if result.file is None or not result.recovered_cleanly:
            self.syntax_ok = False
            return
        identity = os.path.realpath(path)
        self.loaded.add(identity)
        for item in result.file.items:
            if isinstance(item, ast.Import):
                self._import(item, path, stack + (identity,))
        self.files.append(result.file)

    def _import(self, item: ast.Import, importer: str, stack: tuple[str, ...]) -> None:
        if "\0" in item.path.value or not item.path.value.strip():
            self.sink.error("not a file name", item.path.loc)
            return
        path = os.path.normpath(os.path.join(os.path.dirname(importer), item.path.value))
        identity = os.path.realpath(path)
        if identity in stack:
            cycle = [os.path.basename(p) for p in stack[stack.index(identity):]]
            self.sink.error(f"import cycle: {' -> '.join(cycle + [os.path.basename(identity)])}",
                            item.path.loc, "move the shared declarations into a file both import")
            return
        if identity in self.loaded:
            return  # already imported along another path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            self.sink.error(f"imported file `{item.path.value}` not found", item.path.loc,
                            f"imports are relative to the importing file's folder, "
                            f"`{os.path.dirname(importer) or '.'}`")
            return
        except (OSError, UnicodeDecodeError) as err:
            self.sink.error(f"cannot read imported file `{item.path.value}`: {err}", item.path.loc)
            return
        self._load(text, path, stack)

    # ---- names

    def _declare(self, file: ast.SourceFile) -> None:
        for item in file.items:
            if isinstance(item, ast.ModelDecl):
                self._unique(item.name, self.model_decls, item, "model")
            elif isinstance(item, (ast.BehaviorDecl, ast.ComposeDecl)):
                self._unique(item.name, self.entities, item, "name")
                self._plain_name(item.name)

    def _unique(self, name: ast.Word, table: dict, item, what: str) -> None:
        if name.name in table:
            first = table[name.name].name.loc
            self.sink.error(f"{what} `{name.name}` is defined twice", name.loc,
                            f"first defined at {first}")
        else:
            table[name.name] = item

    def _plain_name(self, name: ast.Word) -> None:
        if "." in name.name:
            self.sink.error(f"`{name.name}`: names cannot contain `.`", name.loc,
                            f"try `{name.name.replace('.', '_')}`")

    def _model_of(self, name: ast.Word | None, loc: Location, report: bool) -> str | None:
        """The model a behavior runs on: the one named by `on`, else the only one."""
        if name is not None:
            if name.name in self.model_decls:
                return name.name
            if report:
                self.sink.error(f"unknown model `{name.name}`", name.loc,
                                did_you_mean(name.name, self.model_decls) or _declare_hint())
            return None
        if len(self.model_decls) == 1:
            return next(iter(self.model_decls))
        if report:
            if not self.model_decls:
                self.sink.error("no model declared", loc, _declare_hint())
            else:
                self.sink.error("which model? the spec declares several", loc,
                                f"add `on NAME` after the behavior's name, one of "
                                f"{', '.join(self.model_decls)}")
        return None

    # ---- models

    def _model(self, name: str) -> ir.ModelDecl | None:
        decl = self.model_decls[name]
        base = os.path.dirname(decl.loc.file)
        options = _Block(decl.options, "model", self.sink)
        dtype = self._choice(options.one("dtype"), ("float32", "bfloat16", "float16"), "dtype")
        device = self._choice(options.one("device"), ("cpu", "cuda", "auto"), "device")
        self._plain_name(decl.name)
        source = resolve_model_source(decl.source, base, self.sink)
        if source is None:
            return None
        model = ir.ModelDecl(name=name, source=source.source, kind=source.kind,
                             dtype=dtype or "float32", device=device or "auto",
                             num_layers=source.num_layers, fingerprint=source.fingerprint,
                             loc=decl.name.loc)
        self.models[name] = model
        return model

    # ---- behaviors

    def _facts(self, decl: ast.BehaviorDecl) -> _Facts:
        keys = {s.key for s in decl.sections or ()}
        external = decl.external.kind.name if decl.external else None
        return _Facts(self._model_of(decl.model, decl.name.loc, report=False),
                      "steer" in keys, "train" in keys, external)

    def _behavior(self, decl: ast.BehaviorDecl) -> ir.Behavior | None:
        name = decl.name.name
        base = os.path.dirname(decl.loc.file)
        model_name = self._model_of(decl.model, decl.name.loc, report=True)
        model = self.models.get(model_name or "")
        sections = _Block(decl.sections, "behavior", self.sink)
        steer_s, train_s, eval_s = sections.one("steer"), sections.one("train"), sections.one("eval")
        external = self._external(decl.external, base) if decl.external else None
        if decl.external and train_s:
            self.sink.error(f"`{name}` is trained elsewhere (`from {decl.external.kind.name}`), "
                            "so it cannot have a train section", train_s.key_loc,
                            "remove the train section, or the `from ...` part")
        if not (steer_s or train_s or decl.external):
            self.sink.error(f"behavior `{name}` does nothing", decl.name.loc,
                            "add a steer or train section, or `from model \"folder\"`")
        steer = self._steer(steer_s, base, model) if steer_s else None
        evaluation = self._eval(eval_s, base, decl) if eval_s else None
        train = self._train(train_s, base, steer_s is not None) if train_s else None
        if model_name is None or (steer_s and steer is None) or (train_s and train is None) \
                or (eval_s and evaluation is None) or (decl.external and external is None):
            return None
        return ir.Behavior(name=name, model=model_name, steer=steer, train=train, eval=evaluation,
                           external=external, loc=decl.name.loc)

    def _external(self, ext: ast.External, base: str) -> ir.External | None:
        kind = self._choice_word(ext.kind, ("model", "task_vector"), "source")
        path = resolve_path(ext.path.value, base)
        if kind == "model":
            if not os.path.exists(path):
                self.sink.error(f"model folder `{ext.path.value}` not found", ext.path.loc,
                                f"paths are relative to the spec's folder, `{base or '.'}`")
                return None
            folder = read_model_folder(ext.path, path, self.sink)
            if folder is None:
                return None
            return ir.External(kind="model", path=os.path.abspath(path), fingerprint=folder[1],
                               loc=ext.loc)
        if kind == "task_vector":
            if not path.endswith(".safetensors"):
                self.sink.error("a task vector must be a .safetensors file", ext.path.loc,
                                "other formats can run code when loaded; convert it first")
                return None
            if not os.path.isfile(path):
                self.sink.error(f"task vector file `{ext.path.value}` not found", ext.path.loc,
                                f"paths are relative to the spec's folder, `{base or '.'}`")
                return None
            return ir.External(kind="task_vector", path=os.path.abspath(path),
                               fingerprint="sha256:" + file_sha256(path), loc=ext.loc)
        return None

    def _steer(self, section: ast.Setting, base: str, model: ir.ModelDecl | None) -> ir.Steer | None:
        block = _Block(section.block, "steer", self.sink, repeatable=("pair", "pairs"))
        errors = len(self.sink.errors)
        layers = self._layers(block.one("layers"), model)
        method = self._choice(block.one("method"), ("mean_diff", "pca"), "method") or "mean_diff"
        read = self._choice(block.one("read"), ("last", "mean"), "read position") or "mean"
        strength = self._number(block.one("strength"), low=0, low_open=True, default=4.0)
        if strength is not None and strength > 20:
            self.sink.warning(f"strength {strength:g} is very strong: steered text often stops "
                              "making sense above 20", block.one("strength").values[0].loc,
                              "check it with `sweep`, e.g. `sweep 2, 4, 8, 16`")
        sweep = tuple(self._number_at(v, "sweep") for v in _values(block.one("sweep")))
        pairs, sources = self._pairs(block, base)
        if not block.all("pair") and not block.all("pairs"):
            self.sink.error("steer has no pairs", section.key_loc,
                            'add `pair "prompt" { positive "..." negative "..." }` '
                            'or `pairs "file.jsonl"`')
        elif method == "pca" and 0 < len(pairs) < 2:
            self.sink.error("`method pca` needs at least 2 pairs", block.one("method").values[0].loc)
        if len(self.sink.errors) > errors:
            return None
        return ir.Steer(layers=layers, method=method, strength=strength, read=read,
                        pairs=tuple(pairs), sources=tuple(sources),
                        sweep=tuple(s for s in sweep if s is not None), loc=section.loc)

    def _layers(self, setting: ast.Setting | None, model: ir.ModelDecl | None):
        if setting is None:
            return "auto"
        first = setting.values[0]
        if isinstance(first, ast.Word):
            return self._choice(setting, ("auto",), "layer choice") or "auto"
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
            layers.extend(range(start, end + 1))
        return tuple(sorted(set(layers)))

    def _layer_number(self, num: ast.Num) -> int | None:
        value = num.value
        if num.negative or num.percent or not value.is_integer():
            self.sink.error(f"a layer is a whole number from 0, not {num.source}", num.loc)
            return None
        return int(value)

    def _pairs(self, block: _Block, base: str) -> tuple[list[ir.Pair], list[ir.DataFile]]:
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
        inner = _Block(setting.block, "pair", self.sink)
        texts: dict[str, ast.Str] = {"prompt": prompt}
        for side in ("positive", "negative"):
            found = inner.one(side)
            if found is None:
                self.sink.error(f"pair is missing `{side}`", setting.key_loc,
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

    def _train(self, section: ast.Setting, base: str, steers: bool) -> ir.Train | None:
        block = _Block(section.block, "train", self.sink, repeatable=("example", "examples"))
        errors = len(self.sink.errors)
        examples: list[ir.Example] = []
        sources: list[ir.DataFile] = []
        for setting in block.all("example"):
            response = _Block(setting.block, "example", self.sink).one("response")
            if response is None:
                self.sink.error("example is missing `response`", setting.key_loc,
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
            self.sink.error("train has no examples", section.key_loc,
                            'add `examples "file.jsonl"`, `example "context" { response "..." }` '
                            "or `distill steering { ... }`")
        defaults = ir.Train()
        lr = self._number(block.one("lr"), low=0, high=1, low_open=True, default=defaults.lr)
        if lr is not None and lr > 1e-3:
            self.sink.warning(f"lr {block.one('lr').values[0].source} is high for fine-tuning",
                              block.one("lr").values[0].loc, "fine-tuning usually uses 1e-5 .. 1e-4")
        train = dict(
            examples=tuple(examples), sources=tuple(sources), distill=distill,
            mix=self._mix(block.one("mix"), base),
            lr=lr,
            steps=self._number(block.one("steps"), low=1, whole=True, default=defaults.steps),
            batch=self._number(block.one("batch"), low=1, whole=True, default=defaults.batch),
            warmup=self._number(block.one("warmup"), low=0, whole=True, default=defaults.warmup),
            schedule=self._choice(block.one("schedule"), ("cosine", "constant"), "schedule"),
            clip=self._number(block.one("clip"), low=0, default=defaults.clip),
            seed=self._number(block.one("seed"), low=0, whole=True, default=defaults.seed),
            context=self._choice(block.one("context"), ("frozen", "full"), "context mode"),
            targets=self._groups(block.one("targets")),
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
        value = self._number_at(ratio, "mix", low=0, high=1, low_open=True, high_open=True,
                                percent=True)
        if value is not None and not ratio.percent:
            self.sink.error("write the mix as a percentage", ratio.loc,
                            f"e.g. `mix general {value * 100:g}%`")
            return None
        if value is not None and value > 0.5:
            self.sink.warning(f"a {ratio.source} general mix leaves less than half of training "
                              "for the behavior", ratio.loc, "25% is the usual share")
        loaded = self.data.load(file, base, read_text, TEXT_LINE)
        if value is None or loaded is None:
            return None
        return ir.Mix(ratio=value, texts=loaded.records, source=loaded.source, loc=setting.loc)

    def _groups(self, setting: ast.Setting | None) -> tuple[str, ...] | None:
        if setting is None:
            return None
        groups: list[str] = []
        for word in setting.values:
            if word.name not in ir.PARAMETER_GROUPS:
                self.sink.error(f"unknown parameter group `{word.name}`", word.loc,
                                did_you_mean(word.name, ir.PARAMETER_GROUPS) or
                                f"groups: {', '.join(ir.PARAMETER_GROUPS)}")
            elif word.name in groups:
                self.sink.error(f"`{word.name}` is listed twice", word.loc)
            else:
                groups.append(word.name)
        return tuple(groups)

    def _optimizer(self, setting: ast.Setting | None) -> ir.Optimizer | None:
        if setting is None:
            return None
        name = self._choice(setting, ("apollo", "apollo_mini", "adamw"), "optimizer")
        block = _Block(setting.block, "optimizer", self.sink)
        defaults = ir.Optimizer()
        scale_setting = block.one("scale")
        scale = None
        if scale_setting and isinstance(scale_setting.values[0], ast.Word):
            self._choice(scale_setting, ("auto",), "scale")
        elif scale_setting:
            scale = self._number(scale_setting, low=0, low_open=True)
        betas = defaults.betas
        if block.one("betas"):
            found = [self._number_at(v, "betas", low=0, high=1, high_open=True)
                     for v in block.one("betas").values]
            betas = tuple(found) if None not in found else None
        options = dict(
            name=name,
            rank=self._number(block.one("rank"), low=1, whole=True, default=defaults.rank),
            refresh=self._number(block.one("refresh"), low=1, whole=True, default=defaults.refresh),
            limiter=self._number(block.one("limiter"), low=1, default=defaults.limiter),
            weight_decay=self._number(block.one("weight_decay"), low=0,
                                      default=defaults.weight_decay),
            betas=betas,
        )
        if None in options.values():
            return None
        return ir.Optimizer(**options, scale=scale)

    def _distill(self, setting: ast.Setting | None, base: str, steers: bool) -> ir.Distill | None:
        if setting is None:
            return None
        source = setting.values[0]
        if source.name != "steering":
            self.sink.error(f"cannot distill from `{source.name}`", source.loc,
                            did_you_mean(source.name, ["steering"]) or
                            "distill makes the behavior's steering permanent: `distill steering`")
        elif not steers:
            self.sink.error("`distill steering` needs a steer section in the same behavior",
                            setting.key_loc, "add `steer { ... }` with the pairs to steer by")
        block = _Block(setting.block, "distill", self.sink, repeatable=("prompt",))
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
        elif not block.all("prompt"):
            self.sink.error("distill has no prompts", setting.key_loc,
                            'add `prompts "file.jsonl"` or `prompt "..."` inside its braces')
        defaults = ir.Distill(prompts=())
        samples = self._number(block.one("samples"), low=1, whole=True, default=defaults.samples)
        keep = self._number(block.one("keep"), low=1, whole=True, default=defaults.keep)
        if samples is not None and keep is not None and keep > samples:
            self.sink.error(f"cannot keep {keep} of {samples} samples",
                            (block.one("keep") or setting).loc, "keep at most `samples`")
        options = dict(
            samples=samples, keep=keep,
            temperature=self._number(block.one("temperature"), low=0,
                                     default=defaults.temperature),
            max_tokens=self._number(block.one("max_tokens"), low=1, whole=True,
                                    default=defaults.max_tokens),
            match_activations=self._number(block.one("match_activations"), low=0,
                                           default=defaults.match_activations),
        )
        if None in options.values() or not prompts:
            return None
        return ir.Distill(prompts=tuple(prompts), source=data_file, loc=setting.loc, **options)

    def _eval(self, section: ast.Setting, base: str, decl: ast.BehaviorDecl) -> ir.Eval | None:
        block = _Block(section.block, "eval", self.sink,
                       repeatable=("pair", "pairs", "general", "expect"))
        errors = len(self.sink.errors)
        pairs, sources = self._pairs(block, base)
        general: list[str] = []
        for setting in block.all("general"):
            loaded = self.data.load(setting.values[0], base, read_text, TEXT_LINE)
            if loaded:
                general.extend(loaded.records)
                sources.append(loaded.source)
        facts = self.facts[decl.name.name]
        reported = set(STEER_METRICS if facts.steers else ()) | set(TRAIN_METRICS if facts.trains else ())
        if not reported:
            self.sink.warning("nothing measures this eval: the behavior has no steer or train "
                              "section", section.key_loc)
        expects = []
        for setting in block.all("expect"):
            metric, op, value = setting.values
            if metric.name not in KNOWN_METRICS:
                self.sink.error(f"unknown metric `{metric.name}`", metric.loc,
                                did_you_mean(metric.name, KNOWN_METRICS) or
                                f"metrics: {', '.join(KNOWN_METRICS)}")
                continue
            if reported and metric.name not in reported:
                self.sink.error(f"`{decl.name.name}` does not report `{metric.name}`", metric.loc,
                                f"it reports {', '.join(sorted(reported))}")
                continue
            number = self._number_at(value, "expect")
            if number is not None:
                expects.append(ir.Expectation(metric=metric.name, op=op.text, value=number,
                                              loc=setting.loc))
        if len(self.sink.errors) > errors:
            return None
        return ir.Eval(pairs=tuple(pairs), sources=tuple(sources), general=tuple(general),
                       expect=tuple(expects), loc=section.loc)

    # ---- compositions

    def _compose(self, decl: ast.ComposeDecl) -> ir.Compose | None:
        errors = len(self.sink.errors)
        linear = linearize(decl.expr, self.sink)
        terms: list[tuple[str, float]] = []
        models: dict[str, ast.Ref] = {}
        if linear is not None:
            if linear.constant != 0:
                self.sink.error(f"`{decl.name.name}` adds a plain number ({linear.constant:g}) "
                                "to behaviors", decl.expr.loc,
                                "numbers only scale behaviors: `listen * 2`, not `listen + 2`")
            for name, weight in linear.weights.items():
                ref = linear.refs[name]
                if self._composable(ref, decl.name.name):
                    model = self.facts[name].model
                    if model is not None:
                        models.setdefault(model, ref)
                    if weight == 0:
                        self.sink.warning(f"`{name}` cancels out (its weights add up to 0)", ref.loc)
                    else:
                        terms.append((name, weight))
            if not linear.weights:
                self.sink.error("a composition needs at least one behavior", decl.expr.loc)
        if len(models) > 1:
            (first, _), (second, ref) = list(models.items())[:2]
            self.sink.error(f"`{ref.name}` is on model `{second}`, other terms on `{first}`",
                            ref.loc, "a composition adds task vectors of one base model")
        block = _Block(decl.options, "compose", self.sink)
        merge = self._merge(block.one("merge"), block.one("groups"))
        # no model: its behaviors have no model either, and say why
        if len(self.sink.errors) > errors or not terms or merge is None or not models:
            return None
        return ir.Compose(name=decl.name.name, model=next(iter(models)),
                          terms=tuple(ir.Term(behavior=n, weight=w) for n, w in terms),
                          expression=canonical_text(terms), merge=merge, loc=decl.name.loc)

    def _composable(self, ref: ast.Ref, composition: str) -> bool:
        target = self.entities.get(ref.name)
        if target is None:
            behaviors = [n for n, d in self.entities.items() if isinstance(d, ast.BehaviorDecl)]
            self.sink.error(f"unknown behavior `{ref.name}`", ref.loc,
                            did_you_mean(ref.name, behaviors) or
                            (f"behaviors: {', '.join(behaviors)}" if behaviors else
                             "declare it with `behavior NAME { ... }`"))
            return False
        if isinstance(target, ast.ComposeDecl):
            self.sink.error(f"`{ref.name}` is a composition; compose behaviors", ref.loc,
                            f"write out the terms of `{ref.name}` here" if ref.name != composition
                            else "a composition cannot contain itself")
            return False
        if not self.facts[ref.name].has_weights:
            self.sink.error(f"`{ref.name}` has no weights to compose", ref.loc,
                            "add a train section or `from ...`")
            return False
        return True

    def _merge(self, setting: ast.Setting | None, groups_setting: ast.Setting | None) -> ir.Merge | None:
        groups = self._groups(groups_setting) if groups_setting else ()
        if setting is None:
            return ir.Merge(groups=groups) if groups is not None else None
        method = self._choice(setting, ("task_arithmetic", "ties", "dare"), "merge method")
        block = _Block(setting.block, "merge", self.sink)
        defaults = ir.Merge()
        options = dict(
            method=method,
            density=self._number(block.one("density"), low=0, high=1, low_open=True, percent=True,
                                 default=defaults.density),
            lambda_=self._number(block.one("lambda"), default=defaults.lambda_),
            normalize=self._switch(block.one("normalize"), defaults.normalize),
            seed=self._number(block.one("seed"), low=0, whole=True, default=defaults.seed),
            groups=groups,
        )
        if None in options.values():
            return None
        return ir.Merge(**options, loc=setting.loc)

    # ---- deploys

    def _deploy(self, decl: ast.DeployDecl) -> ir.Deploy | None:
        errors = len(self.sink.errors)
        target = decl.target.name
        steers = trains = False
        entity = self.entities.get(target)
        if entity is None:
            self.sink.error(f"unknown deploy target `{target}`", decl.target.loc,
                            did_you_mean(target, self.entities) or
                            "deploy a behavior or a composition declared in the spec")
        elif isinstance(entity, ast.ComposeDecl):
            steers = self._compose_steers(entity)
        else:
            facts = self.facts[target]
            steers, trains = facts.steers, facts.trains
            if facts.external == "task_vector":
                self.sink.error(f"`{target}` is a task vector, not a model", decl.target.loc,
                                f"deploy a composition of it: `compose {target}_model = {target}`")
            elif not facts.has_weights:
                self.sink.error(f"`{target}` has no weights to deploy", decl.target.loc,
                                "add a train section or `from model \"folder\"`")
        self._choice_word(decl.engine, ("vllm",), "serving engine")
        if isinstance(decl.urls, ast.Word):
            self._choice_word(decl.urls, ("auto",), "server")
            urls = "auto"
        else:
            urls = tuple(self._url(u) for u in decl.urls)
        block = _Block(decl.options, "deploy", self.sink)
        live_setting = block.one("live")
        live = self._switch(live_setting, True) if live_setting and live_setting.values else True
        steering = self._switch(block.one("steering"), False)
        handoff = self._switch(block.one("handoff"), False)
        push_every = self._number(block.one("push_every"), low=0, whole=True, default=0)
        if steering and entity is not None and not steers:
            self.sink.error(f"`{target}` has no steering to serve", block.one("steering").values[0].loc,
                            "give it a steer section, or write `steering off`")
        if handoff and (not steering or not trains):
            self.sink.error("`handoff on` needs `steering on` and a behavior that trains",
                            block.one("handoff").values[0].loc,
                            "handoff lowers the served steering as training moves it into the weights")
        if push_every and entity is not None and (not trains or not live):
            self.sink.error("`push_every` needs a live deploy of a behavior that trains",
                            block.one("push_every").values[0].loc,
                            "pushes during training go to live servers; remove `push_every`")
        if len(self.sink.errors) > errors:
            return None
        return ir.Deploy(target=target, urls=urls, live=live, steering=steering, handoff=handoff,
                         push_every=push_every, loc=decl.loc)

    def _compose_steers(self, decl: ast.ComposeDecl) -> bool:
        names = _refs(decl.expr)
        return any(self.facts[n].steers for n in names if n in self.facts)

    def _url(self, url: ast.Str) -> str:
        parsed = urllib.parse.urlparse(url.value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.sink.error(f"`{url.value}` is not an http(s) URL", url.loc,
                            'write the server\'s address, e.g. "http://127.0.0.1:8000"')
        return url.value

    # ---- values

    def _choice(self, setting: ast.Setting | None, choices: tuple[str, ...], what: str) -> str | None:
        if setting is None:
            return None
        return self._choice_word(setting.values[0], choices, what)

    def _choice_word(self, word: ast.Word, choices: tuple[str, ...], what: str) -> str | None:
        if word.name in choices:
            return word.name
        self.sink.error(f"unknown {what} `{word.name}`", word.loc,
                        did_you_mean(word.name, choices) or f"choose {_one_of(choices)}")
        return None

    def _switch(self, setting: ast.Setting | None, default: bool) -> bool | None:
        if setting is None:
            return default
        word = setting.values[0]
        if word.name in SWITCHES:
            return SWITCHES[word.name]
        self.sink.error(f"`{setting.key}` is `on` or `off`, not `{word.name}`", word.loc,
                        did_you_mean(word.name, SWITCHES))
        return None

    def _number(self, setting: ast.Setting | None, default: float | None = None, **limits):
        if setting is None:
            return default
        return self._number_at(setting.values[0], setting.key, **limits)

    def _number_at(self, num: ast.Num, key: str, *, low: float | None = None,
                   high: float | None = None, low_open: bool = False, high_open: bool = False,
                   whole: bool = False, percent: bool = False):
        if num.percent and not percent:
            self.sink.error(f"`{key}` takes a plain number, not a percentage", num.loc)
            return None
        value = num.value
        if not math.isfinite(value):
            self.sink.error(f"`{num.source}` is too large", num.loc)
            return None
        if whole and not value.is_integer():
            self.sink.error(f"`{key}` must be a whole number, not {num.source}", num.loc)
            return None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            self.sink.error(f"`{key}` must be {_range_text(low, high, low_open, high_open, num.percent)}"
                            f", not {num.source}", num.loc)
            return None
        return int(value) if whole else value


def _range_text(low, high, low_open, high_open, percent) -> str:
    show: Callable[[float], str] = (lambda v: f"{v * 100:g}%") if percent else (lambda v: f"{v:g}")
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'greater than' if low_open else 'at least'} {show(low)}"
    return f"{'less than' if high_open else 'at most'} {show(high)}"


def _values(setting: ast.Setting | None) -> tuple:
    return setting.values if setting else ()


def _one_of(choices: tuple[str, ...]) -> str:
    quoted = [f"`{c}`" for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _refs(expr: ast.Expr) -> list[str]:
    if isinstance(expr, ast.Ref):
        return [expr.name]
    if isinstance(expr, ast.Const):
        return []
    if isinstance(expr, ast.Neg):
        return _refs(expr.operand)
    return _refs(expr.left) + _refs(expr.right)


def _declare_hint() -> str:
    return 'declare one, e.g. `model base = "tiny-gdn"`'
