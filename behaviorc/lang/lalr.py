"""An LALR driver over lark's tables.

Lark computes the tables and the reduce callbacks (which inline `_rules` and `?rules`
and call the AST builder); this loop feeds tokens through them. It does what lark's
ParserState.feed_token does, with the table flattened once into plain dicts keyed by
strings, which makes a large spec parse about twice as fast, and with stacks that error
recovery may inspect, copy and unwind.
"""

from __future__ import annotations

from typing import Any, Callable

from lark import Lark
from lark.parsers.lalr_analysis import Shift

# An action: a state number to shift to, or (symbols popped, rule name, callback).
Reduce = tuple[int, str, Callable[[list], Any]]
Action = int | Reduce


class Tables:
    def __init__(self, parser: Lark) -> None:
        conf = parser.parse_interactive("").parser_state.parse_conf
        self.start, self.end = conf.start_state, conf.end_state
        self.actions: dict[int, dict[str, Action]] = {}
        for state, row in conf.states.items():
            self.actions[state] = {
                str(symbol): target if action is Shift else
                (len(target.expansion), str(target.origin.name), conf.callbacks[target])
                for symbol, (action, target) in row.items()}


class Rejected(Exception):
    """The parser cannot take this token here."""


class Machine:
    """The parser's state: a stack of states and one of values."""

    def __init__(self, tables: Tables, states: list[int] | None = None,
                 values: list | None = None, build: bool = True) -> None:
        self.tables = tables
        self.states = states if states is not None else [tables.start]
        self.values = values if values is not None else []
        self.build = build  # False: reduce without building nodes (for trial parses)

    def expects(self) -> dict[str, Action]:
        """The table row of the current state: what may come next (LALR over-promises:
        a listed terminal may still be refused after reductions; see `accepts`)."""
        return self.tables.actions[self.states[-1]]

    def feed(self, kind: str, token: Any) -> Any:
        """Shift `token` (of terminal `kind`), reducing first as the table says. For
        `$END`, returns the finished tree. Raises Rejected (the stacks may have been
        reduced by then, never corrupted)."""
        actions, states, values = self.tables.actions, self.states, self.values
        while True:
            action = actions[states[-1]].get(kind)
            if action is None:
                raise Rejected(kind)
            if action.__class__ is int:
                states.append(action)
                values.append(token)
                return None
            size, rule, callback = action
            if size:
                children = values[-size:]
                del values[-size:]
                del states[-size:]
            else:
                children = []
            values.append(callback(children) if self.build else None)
            states.append(actions[states[-1]][rule])
            if kind == "$END" and states[-1] == self.tables.end:
                return values[-1]

    def accepts(self) -> set[str]:
        """Terminals the parser can take next, each tried on a copy of the stacks."""
        found = set()
        for terminal in self.expects():
            if not (terminal.isupper() or terminal == "$END"):
                continue
            trial = Machine(self.tables, list(self.states), list(self.values), build=False)
            try:
                trial.feed(terminal, None)
            except Rejected:
                continue
            found.add(terminal)
        return found

    def unwind_to(self, terminal: str) -> None:
        """Pop the stacks back to a state that takes `terminal` (panic-mode recovery:
        the half-parsed construct on top is dropped)."""
        while len(self.states) > 1 and terminal not in self.expects():
            self.states.pop()
            self.values.pop()
