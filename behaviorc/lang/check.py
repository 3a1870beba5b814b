"""Syntax tree -> `ir.Spec`: every semantic check, every error of every file in one run.

The checker is the only producer of the IR. It loads the spec and its imports, resolves
names, decides where each model comes from, and checks each declaration (a behavior's
sections in `sections.py`, values in `values.py`). Everything is reported through one
DiagnosticSink; a spec with any error yields no IR.
"""

from __future__ import annotations

import gc
import hashlib
import os
import urllib.parse
from dataclasses import dataclass

from behaviorc.core import ir
from behaviorc.core.diagnostics import (BehaviorError, Diagnostic, DiagnosticSink, Location,
                                   did_you_mean)
from behaviorc.lang import ast
from behaviorc.core.context import TOO_LONG_HINT, shown
from behaviorc.lang.context import ModelContext, model_texts
from behaviorc.lang.data import DataFiles, resolve_path
from behaviorc.lang.linear import canonical_text, linearize, references
from behaviorc.core.files import sha256_file
from behaviorc.lang.models import check_model_source, read_model_folder
from behaviorc.lang.parse import parse_text
from behaviorc.lang.sections import Sections
from behaviorc.lang.values import (MAX_LORA_RANK, MAX_SEED, MAX_STEPS, MAX_TIMEOUT_S, MIN_TIMEOUT_S,
                                   Block, SWITCHES, Values)
from behaviorc.core.textfiles import TextFileError, read_text_file
from behaviorc.core.vocabulary import DEVICES, DTYPES, EXTERNAL_KINDS


def check_file(path: str) -> tuple[ir.Spec | None, list[Diagnostic]]:
    """The checked spec (None when it has errors) and every diagnostic, warnings too; a
    spec file that cannot be read is one located error."""
    try:
        text = read_text_file(path, "spec").text
    except (OSError, TextFileError) as err:
        return None, [unreadable(path, err)]
    return check_text(text, path)


def unreadable(path: str, err: OSError | TextFileError) -> Diagnostic:
    """The error for a spec file that cannot be read as text, at the bad byte when there
    is one, else at the file's start."""
    if isinstance(err, TextFileError):
        line, column = err.line or 1, err.column or 1
        message, hint = err.message, err.hint
    else:
        line = column = 1
        message, hint = f"cannot read spec `{path}`: {err.strerror or err}", None
    loc = Location(file=path, line=line, column=column, end_line=line, end_column=column + 1)
    return Diagnostic("error", message, loc, hint)


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
    external: str | None  # the word after `from`, as written (checked in _external)
    strength_auto: bool = False  # its steer strength is chosen at build time
    positions: str = "all"  # the positions its steering steers, as written


    @property
    def has_weights(self) -> bool:
        return self.trains or self.external is not None


class _Checker:
    def __init__(self, sink: DiagnosticSink) -> None:
        self.sink = sink
        self.values = Values(sink)
        self.syntax_errors: list[Location] = []  # skipped unknown settings, see _load
        self.sections = Sections(sink, DataFiles(sink), self.values, self.syntax_errors)
        self.files: list[ast.SourceFile] = []
        self.loaded: set[str] = set()
        self.syntax_ok = True
        self.models: dict[str, ir.ModelDecl] = {}
        self.model_decls: dict[str, ast.ModelDecl] = {}
        self.entities: dict[str, ast.BehaviorDecl | ast.ComposeDecl] = {}
        self.facts: dict[str, _Facts] = {}
        self.contexts: dict[str, ModelContext | None] = {}  # by model name, read once

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
        self.syntax_errors.extend(d.loc for d in result.diagnostics if d.severity == "error")
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
            text = read_text_file(path, "spec").text
        except FileNotFoundError:
            self.sink.error(f"imported file `{item.path.value}` not found", item.path.loc,
                            f"imports are relative to the importing file's folder, "
                            f"`{os.path.dirname(importer) or '.'}`")
            return
        except OSError as err:
            self.sink.error(f"cannot read imported file `{item.path.value}`: "
                            f"{err.strerror or err}", item.path.loc)
            return
        except TextFileError as err:
            where = f"{item.path.value}:{err.line}:{err.column}: " if err.line else ""
            self.sink.error(f"imported file `{item.path.value}`: {where}{err.message}",
                            item.path.loc, err.hint)
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
        options = Block(decl.options, "model", self.sink)
        dtype = self.values.choice(options.one("dtype"), DTYPES, "dtype")
        device = self.values.choice(options.one("device"), DEVICES, "device")
        thinking = self.values.switch(options.one("thinking"), False)
        self._plain_name(decl.name)
        source = check_model_source(decl.source, base, self.sink)
        if source is None:
            return None
        model = ir.ModelDecl(name=name, source=source.source, kind=source.kind,
                             dtype=dtype or "float32", device=device or "auto", thinking=thinking or False,
                             num_layers=source.num_layers, fingerprint=source.fingerprint,
                             loc=decl.name.loc)
        self.models[name] = model
        return model

    # ---- behaviors

    def _facts(self, decl: ast.BehaviorDecl) -> _Facts:
        keys = {s.key for s in decl.sections or ()}
        external = decl.external.kind.name if decl.external else None
        return _Facts(self._model_of(decl.model, decl.name.loc, report=False),
                      "steer" in keys, "train" in keys, external, _strength_auto(decl),
                      _steer_word(decl, "positions") or "all")

    def _fixed_strength(self, name: str, loc: Location, use: str) -> None:
        """`strength auto` is chosen when the build verifies; `use` needs it at plan time."""
        if name in self.facts and self.facts[name].strength_auto:
            self.sink.error(f"{use} needs `{name}`'s steering strength, but it is `auto` "
                            "(chosen only when the build verifies the steering)", loc,
                            f"build once, then write the strength the report chose in `{name}`'s steer section")

    def _behavior(self, decl: ast.BehaviorDecl) -> ir.Behavior | None:
        name = decl.name.name
        base = os.path.dirname(decl.loc.file)
        model_name = self._model_of(decl.model, decl.name.loc, report=True)
        model = self.models.get(model_name or "")
        sections = Block(decl.sections, "behavior", self.sink)
        steer_s, train_s, eval_s = sections.one("steer"), sections.one("train"), sections.one("eval")
        external = self._external(decl.external, base) if decl.external else None
        if decl.external and train_s:
            self.sink.error(f"`{name}` is trained elsewhere (`from {decl.external.kind.name}`), "
                            "so it cannot have a train section", train_s.key_loc,
                            "remove the train section, or the `from ...` part")
        if not (steer_s or train_s or decl.external) and \
                not any(decl.encloses(error) for error in self.syntax_errors):
            self.sink.error(f"behavior `{name}` does nothing", decl.name.loc,
                            "add a steer or train section, or `from model \"folder\"`")
        steer = self.sections.steer(steer_s, base, model) if steer_s else None
        evaluation = self.sections.eval(eval_s, base, name, steer_s is not None,
                                        train_s is not None) if eval_s else None
        train = self.sections.train(train_s, base, steer_s is not None) if train_s else None
        if model_name is None or (steer_s and steer is None) or (train_s and train is None) \
                or (eval_s and evaluation is None) or (decl.external and external is None):
            return None
        behavior = ir.Behavior(name=name, model=model_name, steer=steer, train=train,
                               eval=evaluation, external=external, loc=decl.name.loc)
        self._fits_context(behavior, {"steer": steer_s, "train": train_s, "eval": eval_s})
        return behavior

    def _fits_context(self, behavior: ir.Behavior, sections: dict[str, ast.Setting | None]) -> None:
        """Refuse a text the model cannot hold now rather than minutes into the build;
        the first such text of each section is reported."""
        model = self.models.get(behavior.model)
        if model is None:
            return  # its declaration had an error, reported already
        if model.name not in self.contexts:
            self.contexts[model.name] = ModelContext.of(model)
        context = self.contexts[model.name]
        if context is None:
            return
        reported: set[str] = set()
        for section, what, parts in model_texts(behavior):
            if section in reported:
                continue
            reason = context.too_long(parts)
            setting = sections[section]
            if reason and setting is not None:
                reported.add(section)
                start = next((part for part in parts if part), "")
                self.sink.error(f"in `{behavior.name}`'s {section} section, {what} "
                                f"{shown(start)!r} {reason}", setting.key_loc, TOO_LONG_HINT)

    def _external(self, ext: ast.External, base: str) -> ir.External | None:
        kind = self.values.choice_word(ext.kind, EXTERNAL_KINDS, "source")
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
                               fingerprint="sha256:" + sha256_file(path), loc=ext.loc)
        return None

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
                    self._fixed_strength(name, ref.loc, "a composition")
                    model = self.facts[name].model
                    if model is not None:
                        models.setdefault(model, ref)
                    if weight == 0:
                        self.sink.warning(f"`{name}` cancels out (its weights add up to 0)", ref.loc)
                    else:
                        terms.append((name, weight))
            if not linear.weights:
                self.sink.error("a composition needs at least one behavior", decl.expr.loc)
            elif not terms and len(self.sink.errors) == errors:
                self.sink.error(f"every behavior in `{decl.name.name}` cancels out: it composes "
                                "nothing", decl.expr.loc,
                                "give at least one behavior a weight other than 0")
        steered = {name: self.facts[name].positions for name, _ in terms if self.facts[name].steers}
        if len(set(steered.values())) > 1:
            (first, one), (second, other) = sorted(steered.items(), key=lambda item: item[1])[:2]
            self.sink.error(f"`{first}` steers `{one}` positions and `{second}` `{other}`: a "
                            "composition adds their steering vectors into one", decl.expr.loc,
                            "give them the same `steer { positions ... }`")
        if len(models) > 1:
            (first, _), (second, ref) = list(models.items())[:2]
            self.sink.error(f"`{ref.name}` is on model `{second}`, other terms on `{first}`",
                            ref.loc, "a composition adds task vectors of one base model")
        block = Block(decl.options, "compose", self.sink)
        merged = self._merge(block.one("merge"), block.one("groups"))
        # no model: its behaviors have no model either, and say why
        if len(self.sink.errors) > errors or not terms or merged is None or not models:
            return None
        merge, own_settings = merged
        from behaviorc.core.merge_methods import (METHODS, ignores_weights, merge_setting_problem,
                                                  terms_problem)

        traits = METHODS[merge.method]
        normalizes = traits.normalize if merge.normalize is None else merge.normalize
        weights = [w for _, w in terms]
        problem = terms_problem(merge.method, weights, normalizes)
        if problem:
            self.sink.error(problem[0], decl.expr.loc, problem[1])
            return None
        if ignores_weights(merge.method, weights):
            self.sink.warning(f"`{merge.method}` takes no weights: each behavior counts once, "
                              "as in mergekit", decl.expr.loc,
                              "write the plain sum, or weight them with linear, "
                              "task_arithmetic or ties")
        if traits.task_arithmetic and normalizes and any(w < 0 for w in weights):
            # mergekit divides by the summed weights (of the agreeing terms, with a sign
            # election): with a negative one that sum can be near zero or negative,
            # flipping the result.
            self.sink.warning(f"`{merge.method}` with `normalize on` divides by signed "
                              "weights, so a subtracted behavior can flip or amplify the "
                              "merge", merge.loc,
                              "write `normalize off` when a composition subtracts a behavior")
        names = [name for name, _ in terms]
        for name, (setting, _) in own_settings.items():
            if name not in names:
                self.sink.error(f"`{name}` is not a term of `{decl.name.name}`",
                                setting.values[0].loc,
                                did_you_mean(name, names) or f"its terms: {', '.join(names)}")
        ir_terms = []
        for name, weight in terms:
            setting, own = own_settings.get(name, (None, {}))
            term = ir.Term(behavior=name, weight=weight, **own)
            ir_terms.append(term)
            problem = setting and merge_setting_problem(
                merge.method, merge.density if term.density is None else term.density,
                merge.epsilon if term.epsilon is None else term.epsilon,
                merge.gamma if term.gamma is None else term.gamma)
            if problem:
                self.sink.error(f"`merge {merge.method}`, term `{name}`: {problem}",
                                setting.loc,
                                "della keeps entries with probabilities density ± epsilon")
        if len(self.sink.errors) > errors:
            return None
        return ir.Compose(name=decl.name.name, model=next(iter(models)), terms=tuple(ir_terms),
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

    def _merge(self, setting: ast.Setting | None, groups_setting: ast.Setting | None
               ) -> tuple[ir.Merge, dict[str, tuple[ast.Setting, dict[str, float]]]] | None:
        """The merge, and each `term NAME { ... }` block's settings by behavior name."""
        from behaviorc.core.merge_methods import (
            ALIASES, METHOD_NAMES, METHODS, PER_TERM, REFUSED_METHODS, REFUSED_SETTINGS,
            merge_setting_problem)

        groups = self.values.groups(groups_setting) if groups_setting else ()
        if setting is None:
            return (ir.Merge(groups=groups), {}) if groups is not None else None
        errors = len(self.sink.errors)
        word = setting.values[0]
        if word.name in REFUSED_METHODS:
            why, instead = REFUSED_METHODS[word.name]
            self.sink.error(f"merge method `{word.name}` {why}", word.loc, instead)
            return None
        method = self.values.choice(setting, METHOD_NAMES, "merge method")
        block = Block(setting.block, "merge", self.sink, repeatable=("term",))
        if method is None:
            return None
        method = ALIASES.get(method, method)
        takes = METHODS[method].settings
        per_term = [name for name in PER_TERM if name in takes]
        for key, found in block.by_key.items():
            if key in REFUSED_SETTINGS:
                why, instead = REFUSED_SETTINGS[key]
                self.sink.error(f"`{key}` {why}", found[0].key_loc, instead)
            elif key == "term" and not per_term:
                self.sink.error(f"`{method}` takes no per-term settings", found[0].key_loc,
                                "per-term density, epsilon and gamma belong to the "
                                "sparsifying methods (ties, dare, della, breadcrumbs)")
            elif key not in takes and key != "term":
                self.sink.warning(f"`{key}` has no effect on `{method}`", found[0].key_loc,
                                  f"`{method}` takes {', '.join(takes)}" if takes else
                                  f"`{method}` takes no settings")
        defaults = ir.Merge()
        number = self.values.number
        options = dict(
            method=method,
            density=self._density(block.one("density"), defaults.density),
            lambda_=number(block.one("lambda"), default=defaults.lambda_),
            normalize=self._optional_switch(block.one("normalize")),
            rescale=self._optional_switch(block.one("rescale")),
            epsilon=self._epsilon(block.one("epsilon"), defaults.epsilon),
            gamma=self._gamma(block.one("gamma"), defaults.gamma),
            seed=number(block.one("seed"), low=0, high=MAX_SEED, whole=True, default=defaults.seed),
            t=number(block.one("t"), default=None),
            flatten=self.values.switch(block.one("flatten"), defaults.flatten),
            row_wise=self.values.switch(block.one("row_wise"), defaults.row_wise),
            filter_wise=self.values.switch(block.one("filter_wise"), defaults.filter_wise),
            max_iter=number(block.one("max_iter"), low=0, whole=True, default=defaults.max_iter),
            tol=number(block.one("tol"), low=0, low_open=True, default=defaults.tol),
            eps=number(block.one("eps"), low=0, default=defaults.eps),
            groups=groups,
        )
        if method == "slerp" and block.one("t") is None:
            self.sink.error("`merge slerp` needs `t`: where between the two models to go",
                            setting.key_loc, "e.g. `merge slerp { t 0.5 }`: 0 is the first "
                            "model (the base, with one term), 1 the second")
        if method == "nuslerp" and options["flatten"] and block.one("row_wise"):
            self.sink.warning("`row_wise` has no effect with `flatten on` (the default)",
                              block.one("row_wise").key_loc, "write `flatten off  row_wise on`")
        own: dict[str, tuple[ast.Setting, dict[str, float]]] = {}
        for term in block.all("term") if per_term else ():
            name = term.values[0].name
            if name in own:
                self.sink.error(f"`term {name}` is given twice", term.key_loc,
                                f"first on line {own[name][0].loc.line}; keep one")
                continue
            own[name] = (term, self._term_settings(term, method, per_term))
        if len(self.sink.errors) > errors:
            return None
        problem = merge_setting_problem(method, options["density"], options["epsilon"],
                                        options["gamma"])
        if problem:  # the settings are each in range but do not fit together
            blamed = block.one("epsilon") or block.one("density") or setting
            self.sink.error(f"`merge {method}`: {problem}", blamed.loc,
                            "della keeps entries with probabilities density ± epsilon")
            return None
        return ir.Merge(**options, loc=setting.loc), own

    def _term_settings(self, term: ast.Setting, method: str, per_term: list[str]
                       ) -> dict[str, float]:
        from behaviorc.core.merge_methods import REFUSED_SETTINGS

        block = Block(term.block, "term", self.sink)
        for key, found in block.by_key.items():
            if key in REFUSED_SETTINGS:
                why, instead = REFUSED_SETTINGS[key]
                self.sink.error(f"`{key}` {why}", found[0].key_loc, instead)
            elif key not in per_term:
                self.sink.warning(f"`{key}` has no effect on `{method}`", found[0].key_loc,
                                  f"a term of `{method}` takes {', '.join(per_term)}")
        given = {"density": self._density(block.one("density"), None),
                 "epsilon": self._epsilon(block.one("epsilon"), None),
                 "gamma": self._gamma(block.one("gamma"), None)}
        return {key: value for key, value in given.items()
                if key in per_term and value is not None}

    def _density(self, setting: ast.Setting | None, default: float | None) -> float | None:
        return self.values.number(setting, low=0, high=1, percent=True, default=default)

    def _epsilon(self, setting: ast.Setting | None, default: float | None) -> float | None:
        return self.values.number(setting, low=0, high=0.5, low_open=True, high_open=True,
                                  default=default)

    def _gamma(self, setting: ast.Setting | None, default: float | None) -> float | None:
        return self.values.number(setting, low=0, high=1, high_open=True, percent=True,
                                  default=default)

    def _optional_switch(self, setting: ast.Setting | None) -> bool | None:
        """An on/off setting, None when not given (the method's default applies)."""
        return None if setting is None else self.values.switch(setting, False)

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
            elif not facts.has_weights and not steers:
                self.sink.error(f"`{target}` has no weights to deploy", decl.target.loc,
                                "add a train section or `from model \"folder\"`")
        self.values.choice_word(decl.engine, ("vllm",), "serving engine")
        if isinstance(decl.urls, ast.Word):
            self.values.choice_word(decl.urls, ("auto",), "server")
            urls = "auto"
        else:
            urls = tuple(self._url(u) for u in decl.urls)
        block = Block(decl.options, "deploy", self.sink)
        live_setting = block.one("live")
        live = self.values.switch(live_setting, True) if live_setting and live_setting.values else True
        steering_setting = block.one("steering")
        # `steering named`: register the vectors under the target's name, steering only
        # the requests that ask for them (vllm_xargs.steer); nothing server-wide.
        named = bool(steering_setting and steering_setting.values
                     and steering_setting.values[0].name == "named")
        steering: bool | None = False
        if steering_setting and steering_setting.values and not named:
            word = steering_setting.values[0]
            if word.name in SWITCHES:
                steering = SWITCHES[word.name]
            else:
                self.sink.error(f"`steering` is `on`, `off` or `named`, not `{word.name}`",
                                word.loc, did_you_mean(word.name, [*SWITCHES, "named"]))
        handoff = self.values.switch(block.one("handoff"), False)
        push_every = self.values.number(block.one("push_every"), low=0, high=MAX_STEPS, whole=True,
                                        default=0)
        timeout = self.values.number(block.one("timeout"), low=MIN_TIMEOUT_S, high=MAX_TIMEOUT_S)
        api_key = self._api_key(block.one("api_key"))
        as_setting = block.one("as")
        lora = self._lora_form(as_setting) if as_setting is not None else None
        if lora is not None and (steering or named or handoff or push_every):
            self.sink.error("`as lora` serves the weights' change as an adapter: it takes no "
                            "`steering`, `handoff` or `push_every`", as_setting.loc,
                            "deploy the steering in a deploy of its own")
        elif (lora is not None and isinstance(entity, ast.BehaviorDecl)
              and not self.facts[target].has_weights):
            self.sink.error(f"`{target}` has no weights to serve as a LoRA adapter",
                            as_setting.values[0].loc,
                            "add a train section, or deploy its steering with `steering on`")
        if steering and isinstance(entity, ast.BehaviorDecl):
            self._fixed_strength(target, block.one("steering").values[0].loc, "`steering on`")
        if (isinstance(entity, ast.BehaviorDecl) and steers and not self.facts[target].has_weights
                and block.one("steering") is None):
            self.sink.error(f"`{target}` only steers: its deploy must say `steering on` (attach "
                            f"its vectors to every request), `steering named` (to the requests "
                            f"that ask for `{target}`) or `steering off` (detach them)",
                            decl.target.loc, "add `{ steering on }`")
        if (steering or named) and entity is not None and not steers:
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
        return ir.Deploy(target=target, urls=urls, live=live, steering=steering, named=named,
                         handoff=handoff, push_every=push_every, lora=lora, api_key=api_key,
                         timeout=timeout, loc=decl.loc)

    def _lora_form(self, setting: ast.Setting) -> ir.LoraForm | None:
        if self.values.choice(setting, ("lora",), "deploy form") is None:
            return None
        block = Block(setting.block, "as lora", self.sink)
        rank = self.values.number(block.one("rank"), low=1, high=MAX_LORA_RANK, whole=True)
        energy = self.values.number(block.one("energy"), low=0, low_open=True, high=1,
                                    percent=True)
        if rank is not None and energy is not None:
            self.sink.error("`as lora` takes a `rank` or an `energy` share, not both",
                            block.one("energy").loc,
                            "`rank 16`: at most 16 per matrix; `energy 90%`: per matrix the "
                            "fewest singular values that keep 90% of its change")
            return None
        return ir.LoraForm(rank=int(rank) if rank is not None else None, energy=energy)

    def _api_key(self, setting: ast.Setting | None) -> str | None:
        if setting is None:
            return None
        key = setting.values[0]
        if not key.value or not all(c.isascii() and c.isprintable() and not c.isspace()
                                    for c in key.value):
            self.sink.error("an API key is one word of printable ASCII characters", key.loc,
                            "or leave `api_key` out and set BEHAVIORC_API_KEY")
        return key.value

    def _compose_steers(self, decl: ast.ComposeDecl) -> bool:
        names = [ref.name for ref in references(decl.expr)]
        return any(self.facts[n].steers for n in names if n in self.facts)

    def _url(self, url: ast.Str) -> str:
        parsed = urllib.parse.urlparse(url.value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.sink.error(f"`{url.value}` is not an http(s) URL", url.loc,
                            'write the server\'s address, e.g. "http://127.0.0.1:8000"')
        elif parsed.username is not None or parsed.password is not None:
            # plans, reports and errors print URLs: a password in one is shown to everyone
            self.sink.error("a server URL holds no user or password", url.loc,
                            "give the server's key with `api_key`, or in BEHAVIORC_API_KEY")
        else:
            try:
                port = parsed.port
            except ValueError:  # past 65535, or not a number
                port = 0
            if port == 0:
                self.sink.error(f"`{url.value}` has no valid port (1..65535)", url.loc)
        return url.value


def _declare_hint() -> str:
    return 'declare one, e.g. `model base = "tiny-gdn"`'


def _strength_auto(decl: ast.BehaviorDecl) -> bool:
    return _steer_word(decl, "strength") == "auto"


def _steer_word(decl: ast.BehaviorDecl, key: str) -> str | None:
    """The word a behavior's steer section gives `key`, as written (None: not a word)."""
    for section in decl.sections or ():
        if section.key == "steer":
            for setting in section.block or ():
                if setting.key == key and isinstance(setting.values[0], ast.Word):
                    return setting.values[0].name
    return None
