"""`behaviorc check`, `behaviorc plan` and `behaviorc fmt`.

Exit codes: 0 ok, 1 a spec has errors (or `fmt --check` would change a file), 2 usage
errors such as a file that does not exist. Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from behaviorc.core.atomic import write_text_atomic
from behaviorc.core.diagnostics import BehaviorError, Diagnostic
from behaviorc.core.textfiles import LIMITS, size_text as _size

CHECK_EPILOG = """\
examples:
  behaviorc check specs/listen.behavior
  behaviorc check specs/*.behavior

Every error in a file is reported in one run, as
  specs/listen.behavior:7:5: error: unknown setting `strenght` in `steer`
followed by the source line, a caret under the mistake and a hint.

Specs and data files are UTF-8 (a byte-order mark is dropped; lines end in \\n, \\r\\n
or \\r) and regular files. Size limits, each raised by its environment variable:
""" + "".join(f"  {what:<24}{_size(default):>8}  {variable}\n"
              for variable, default, what in LIMITS.values())

PLAN_EPILOG = """\
examples:
  behaviorc plan specs/persona.behavior          the task tree, dependencies beneath
  behaviorc plan specs/persona.behavior --json   the same as JSON, with every task's inputs

Each task shows its id (kind:name), the first 8 characters of its content key and the
spec line it comes from. A build reuses every task whose key is unchanged.
"""

FMT_EPILOG = """\
examples:
  behaviorc fmt specs/listen.behavior            rewrite it in the canonical layout
  behaviorc fmt --check specs/*.behavior         CI: exit 1 and name files that would change

Comments are kept; formatting a formatted file changes nothing.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check", help="find every error in specs",
        description="Check specs: syntax, names, value ranges, data files, models.",
        epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("specs", nargs="+", metavar="SPEC", help=".behavior files")
    check.set_defaults(run=run_check)

    plan = subparsers.add_parser(
        "plan", help="show the tasks a build would run",
        description="Check a spec and show its plan: the tasks a build runs, in a tree.",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("spec", metavar="SPEC", help="a .behavior file")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=run_plan)

    fmt = subparsers.add_parser(
        "fmt", help="rewrite specs in the canonical layout",
        description="Format specs in place: indentation, spacing and line breaks.",
        epilog=FMT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fmt.add_argument("specs", nargs="+", metavar="SPEC", help=".behavior files")
    fmt.add_argument("--check", action="store_true",
                     help="change nothing; exit 1 if a file is not formatted")
    fmt.set_defaults(run=run_fmt)


def run_check(args: argparse.Namespace) -> int:
    from behaviorc.lang.check import check_file

    status = 0
    for path in args.specs:
        if not _exists(path):
            status = max(status, 2)
            continue
        try:
            spec, diagnostics = check_file(path)
        except BehaviorError as err:  # this file's problem: the batch goes on
            diagnostics, spec = err.diagnostics, None
        _print_diagnostics(diagnostics)
        if spec is None:
            status = max(status, 1)
        else:
            print(f"{path}: ok ({_count(len(spec.models), 'model')}, "
                  f"{_count(len(spec.behaviors), 'behavior')}, "
                  f"{_count(len(spec.compositions), 'composition')}, "
                  f"{_count(len(spec.deploys), 'deploy')})")
    return status


def run_plan(args: argparse.Namespace) -> int:
    from behaviorc.lang.check import check_file
    from behaviorc.pipeline.lower import lower

    if not _exists(args.spec):
        return 2
    spec, diagnostics = check_file(args.spec)
    _print_diagnostics(diagnostics)
    if spec is None:
        return 1
    plan = lower(spec)
    print(plan.to_json() if args.json else plan.render_tree())
    return 0


def run_fmt(args: argparse.Namespace) -> int:
    from behaviorc.lang.check import unreadable
    from behaviorc.lang.fmt import format_text
    from behaviorc.core.textfiles import TextFileError, read_text_file

    status = 0
    for path in args.specs:
        if not _exists(path):
            status = max(status, 2)
            continue
        try:
            source = read_text_file(path, "spec")
        except (OSError, TextFileError) as err:
            _print_diagnostics([unreadable(path, err)])
            status = max(status, 1)
            continue
        formatted, diagnostics = format_text(source.text, path)
        if formatted is None:
            _print_diagnostics(diagnostics)
            status = max(status, 1)
        elif formatted.encode("utf-8") != source.raw:  # a BOM or CR line ends change too
            if args.check:
                print(f"would reformat {path}", file=sys.stderr)
                status = max(status, 1)
            else:
                _write_keeping_mode(path, formatted)
                print(f"formatted {path}")
    return status


def _exists(path: str) -> bool:
    if os.path.exists(path) and not os.path.isdir(path):
        return True  # a file that is not a regular one is refused, located, when read
    what = "is a folder, not a spec file" if os.path.isdir(path) else "no such file"
    print(f"behaviorc: {path}: {what}", file=sys.stderr)
    return False


def _print_diagnostics(diagnostics: list[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        print(diagnostic.render(), file=sys.stderr)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _write_keeping_mode(path: str, text: str) -> None:
    # the file a symlinked spec points to is rewritten; the link stays a link
    write_text_atomic(Path(path).resolve(), text, mode=os.stat(path).st_mode & 0o777)
