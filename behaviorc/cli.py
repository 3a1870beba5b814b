"""The `behaviorc` command.

Each area of the project registers its own subcommands (a `register(subparsers)`
function in its `commands` module), so this file only dispatches and turns user-facing
errors into diagnostics: a BehaviorError prints where and why and exits 1; usage errors
exit 2; anything else is a bug and says so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from behaviorc import __version__
from behaviorc.core.diagnostics import BehaviorError

COMMAND_MODULES = (
    "behaviorc.pipeline.spec_commands",
    "behaviorc.model.commands",
    "behaviorc.compose.commands",
    "behaviorc.compose.lora_commands",
    "behaviorc.pipeline.commands",
    "behaviorc.engine.vllm.commands",
    "behaviorc.steer.commands",
    "behaviorc.lab.commands",
    "behaviorc.lab.pairs",
)

DESCRIPTION = """\
Compile .behavior specs into steering vectors, fine-tuned weights and composed models,
and deploy them into a live vLLM server.

  behaviorc check specs/listen.behavior          find every error in a spec
  behaviorc plan specs/listen.behavior           show the tasks a build would run
  behaviorc build specs/listen.behavior --out out/listen
  behaviorc dash out/listen                      watch or replay a build
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="behaviorc", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"behaviorc {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except BehaviorError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("behaviorc: stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (`| head`) went away; point stdout at nothing so the final flush
        # at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:  # a bug: say so plainly, keep the details for the report
        print("behaviorc: internal error (this is a bug in behaviorc, please report it):",
              file=sys.stderr)
        traceback.print_exc()
        return 3


if __name__ == "__main__":
    sys.exit(main())
