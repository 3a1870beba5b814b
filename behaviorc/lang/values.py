"""Reading setting values: each block's settings by key, and values checked against
their kind and range, every problem reported at the value."""

from __future__ import annotations

import math
from typing import Callable

from behaviorc.core import ir
from behaviorc.core.diagnostics import DiagnosticSink, did_you_mean
from behaviorc.lang import ast

SWITCHES = {"on": True, "off": False, "true": True, "false": False}

# Bounds past which a setting cannot be meant: they would overflow the model's numbers,
# spin for days, or exhaust memory before the first step.
MAX_STRENGTH = 1000.0  # steering past ~20 already breaks the text (a warning says so)
MAX_STEPS = 1_000_000
MAX_BATCH = 4096  # sequences in one step, all of them in memory at once
MAX_RANK = 65536  # APOLLO's projection rank: above a matrix's side it is plain AdamW
MAX_LORA_RANK = 512  # the largest max-lora-rank vLLM takes
MAX_SEED = 2**32 - 1  # numpy's and torch's generators take 32 bits
MIN_TIMEOUT_S = 0.1  # no server answers faster
MAX_TIMEOUT_S = 86400.0


class Block:
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


class Values:
    """Reads setting values, reporting each one that is out of place or range."""

    def __init__(self, sink: DiagnosticSink) -> None:
        self.sink = sink

    def choice(self, setting: ast.Setting | None, choices: tuple[str, ...], what: str) -> str | None:
        if setting is None:
            return None
        return self.choice_word(setting.values[0], choices, what)

    def choice_word(self, word: ast.Word, choices: tuple[str, ...], what: str) -> str | None:
        if word.name in choices:
            return word.name
        self.sink.error(f"unknown {what} `{word.name}`", word.loc,
                        did_you_mean(word.name, choices) or f"choose {_one_of(choices)}")
        return None

    def switch(self, setting: ast.Setting | None, default: bool) -> bool | None:
        if setting is None:
            return default
        word = setting.values[0]
        if word.name in SWITCHES:
            return SWITCHES[word.name]
        self.sink.error(f"`{setting.key}` is `on` or `off`, not `{word.name}`", word.loc,
                        did_you_mean(word.name, SWITCHES))
        return None

    def number(self, setting: ast.Setting | None, default: float | None = None, **limits):
        if setting is None:
            return default
        return self.number_at(setting.values[0], setting.key, **limits)

    def number_at(self, num: ast.Num, key: str, *, low: float | None = None,
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


    def groups(self, setting: ast.Setting | None) -> tuple[str, ...] | None:
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


def _range_text(low, high, low_open, high_open, percent) -> str:
    show: Callable[[float], str] = (lambda v: f"{v * 100:g}%") if percent else (
        lambda v: str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}")
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'greater than' if low_open else 'at least'} {show(low)}"
    return f"{'less than' if high_open else 'at most'} {show(high)}"


def values_of(setting: ast.Setting | None) -> tuple:
    return setting.values if setting else ()


def _one_of(choices: tuple[str, ...]) -> str:
    quoted = [f"`{c}`" for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
