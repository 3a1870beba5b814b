"""`behaviorc build`, `behaviorc clean` and `behaviorc dash`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from behaviorc.core.diagnostics import BehaviorError, did_you_mean
from behaviorc.core.task import Task
from behaviorc.pipeline.context import CancelSignal
from behaviorc.core.events import EVENTS_FILE
from behaviorc.tui.styles import reply_table_lines
from behaviorc.pipeline import outputs
from behaviorc.pipeline.executor import (CANCEL_FILE, STORE_DIR, BuildOutcome, Executor, cancel_on_sigint,
                                      plan_order)
from behaviorc.pipeline.parallel import Jobs
from behaviorc.pipeline.report import REPORT_FILE, count_statuses
from behaviorc.pipeline.store import Store

if TYPE_CHECKING:
    from behaviorc.pipeline.plan import Plan

BUILD_EPILOG = """\
examples:
  behaviorc build specs/listen.behavior              build into out/listen
  behaviorc build specs/listen.behavior --tui        and watch it in the dashboard
  behaviorc build specs/persona.behavior --only train:listen
  behaviorc build specs/listen.behavior --force      rebuild even what is stored
  behaviorc build specs/persona.behavior --jobs 2    two independent tasks at a time
  behaviorc build specs/listen.behavior --nproc 2    train on 2 processes (FSDP2)

An unchanged rebuild runs nothing; a changed strength or weight reruns only what depends
on it. Ctrl-C stops at the next checkpoint and keeps every finished task (exit 130).
Results: DIR/report.json, events: DIR/events.jsonl, stored artifacts: DIR/.store/.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build", help="run a spec: steer, train, compose, deploy",
        description="Run every task of a spec's plan, reusing stored results whose inputs "
                    "did not change.",
        epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("spec", type=Path, help="the .behavior file")
    build.add_argument("--out", type=Path, help="build folder (default: out/<spec name>)")
    build.add_argument("--force", action="store_true", help="rerun tasks even when stored")
    build.add_argument("--force-out", action="store_true",
                       help="build into an --out folder that holds files no build wrote "
                            "(refused without it; report.json and events.jsonl there are "
                            "replaced, and `clean` later removes only what builds wrote)")
    build.add_argument("--tui", action="store_true", help="show the Textual dashboard")
    build.add_argument("--jobs", default="1", metavar="N",
                       help="run up to N independent tasks at once, each in a worker process "
                            "(training, steering, measurements; live deploys run alone); "
                            "`auto`: one per usable core while memory allows (default 1)")
    build.add_argument("--nproc", type=int, metavar="N",
                       help="train on N processes (one per GPU, or per CPU core), each model "
                            "sharded over them with FSDP2; everything else runs once. Several "
                            "machines: start `behaviorc build` with torchrun instead")
    build.add_argument("--only", metavar="TASK",
                       help="build one task and what it needs (an id like train:listen, "
                            "or a name when only one task has it)")
    build.set_defaults(run=run_build)

    clean = subparsers.add_parser(
        "clean", help="remove a build folder's stored results, events and report",
        description="Remove what `behaviorc build` wrote into a build folder (the store "
                    "records each file); anything else in the folder is kept. Stored results "
                    "are kept across builds (a spec edited back reuses them); --unused removes "
                    "only those the last build did not use.",
        epilog="examples:\n  behaviorc clean out/listen\n"
               "  behaviorc clean out/listen --unused   keep what the last build used",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    clean.add_argument("dir", type=Path, help="the build folder (--out of the build)")
    clean.add_argument("--unused", action="store_true",
                       help="remove only the stored results no task of the last build used "
                            "(its report.json says which); keep the report and events")
    clean.set_defaults(run=run_clean)

    dash = subparsers.add_parser(
        "dash", help="watch a running build, or replay a finished one",
        description="The dashboard for a build folder: follows a build while it runs; "
                    "key c asks it to stop.",
        epilog="example:\n  behaviorc build specs/listen.behavior &\n  behaviorc dash out/listen",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    dash.add_argument("dir", type=Path, help="the build folder (--out of the build)")
    dash.set_defaults(run=run_dash)


# --- build ------------------------------------------------------------------------------

def load_plan(spec_path: Path, warn: bool = True) -> "Plan":
    """Check and lower a spec. Warnings go to stderr; errors stop here (all of them)."""
    from behaviorc.lang import check_file
    from behaviorc.pipeline.lower import lower

    spec, diagnostics = check_file(str(spec_path))
    if spec is None:
        raise BehaviorError("the spec has errors", diagnostics=diagnostics)
    for warning in diagnostics if warn else ():
        print(warning.render(), file=sys.stderr)
    return lower(spec)


def select(tasks: Sequence[Task], wanted: str) -> Task:
    by_id = {t.id: t for t in tasks}
    if wanted in by_id:
        return by_id[wanted]
    named = [t for t in tasks if t.name == wanted]
    if len(named) == 1:
        return named[0]
    if named:
        raise BehaviorError(f"`{wanted}` names {len(named)} tasks",
                            hint="use one id: " + ", ".join(t.id for t in named))
    raise BehaviorError(f"no task `{wanted}` in this plan",
                        hint=did_you_mean(wanted, by_id) or "see `behaviorc plan SPEC` for the ids")


def open_out_folder(out: Path, what: str) -> CancelSignal:
    """Create a build's (or experiment's) folder; its cancel signal also watches the
    folder's cancel file, so `behaviorc dash` can stop it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BehaviorError(f"cannot use {out} as the {what} folder: {err.strerror or err}",
                            hint="pass another folder with --out") from None
    return CancelSignal(out / CANCEL_FILE)


def run_build(args: argparse.Namespace) -> int:
    from behaviorc.pipeline.launch import join_world, launch, launched
    from behaviorc.engine.devices import check_process_count

    if args.nproc is not None and not launched():
        check_process_count(args.nproc, "--nproc")
        if args.nproc > 1 and args.tui:
            raise BehaviorError("--nproc runs the build in other processes: the dashboard cannot "
                                "show it from here", hint="watch it with `behaviorc dash DIR`")
        if args.nproc > 1:
            return launch(_build_argv(args), args.nproc)
    world = join_world()
    code = None
    try:
        if world is not None and world.rank != 0:
            from behaviorc.train.ranks import follow
            code = follow(world, lambda: _training_tasks(args.spec))
        else:
            code = _build(args, distributed=world is not None)
        return code
    finally:
        if world is not None:
            from behaviorc.train.ranks import release
            release(world, code)


def _build_argv(args: argparse.Namespace) -> list[str]:
    """The same build, as each launched process runs it."""
    argv = ["build", str(args.spec), "--jobs", args.jobs, "--nproc", str(args.nproc)]
    argv += ["--out", str(args.out)] if args.out else []
    argv += ["--only", args.only] if args.only else []
    argv += ["--force-out"] if args.force_out else []
    return argv + (["--force"] if args.force else [])


def _training_tasks(spec_path: Path) -> dict:
    from behaviorc.train.task import TrainBehavior

    plan = load_plan(spec_path, warn=False)
    return {t.id: t for t in plan_order(plan.tasks) if isinstance(t, TrainBehavior)}


def _build(args: argparse.Namespace, distributed: bool) -> int:
    spec_path: Path = args.spec
    jobs = Jobs.parse(args.jobs)
    if distributed and jobs.most > 1:
        raise BehaviorError("a build on several processes runs its tasks one at a time",
                            hint="drop --jobs, or build without --nproc")
    plan = load_plan(spec_path)
    targets = [select(plan.tasks, args.only)] if args.only else list(plan.tasks)
    out: Path = args.out or Path("out") / spec_path.stem
    cancel = open_out_folder(out, "build")
    settings = dict(force=args.force, force_out=args.force_out, spec_path=str(spec_path.resolve()), spec_sha256=plan.spec.sha256,
                    cancel=cancel, expectations=plan.expectations, jobs=jobs)
    if args.tui:
        return _build_with_dashboard(out, targets, cancel, settings)

    from rich.console import Console
    from behaviorc.pipeline.progress import TerminalProgress

    console = Console()
    progress = TerminalProgress(console, cancel)
    executor = Executor(out, listeners=[progress], **settings)
    with cancel_on_sigint(cancel), progress:
        outcome = executor.run(targets)
    _print_outcome(outcome, out)
    return outcome.exit_code


def _publish_results(outcome: BuildOutcome, out: Path) -> None:
    """Friendly names in `out/<behavior>/` for what the build made (build.results),
    and its plots beside them (build.plots)."""
    from behaviorc.pipeline.plots import write_build_plots
    from behaviorc.pipeline.results import link_results
    from behaviorc.core.events import read_events
    from behaviorc.tui.state import BuildState

    finished = [(r.task, r.result) for r in outcome.records
                if r.status in ("done", "cached") and r.result is not None]
    out = out.resolve()
    written = link_results(out, finished)
    state = BuildState()
    for event in read_events(outcome.events_path):
        state.apply(event)
    written += write_build_plots(out, state)
    if written:
        print(f"results: {', '.join(sorted({str(path.parent) for path in written}))}")


class BuildThread(threading.Thread):
    """A build running beside the dashboard (Textual needs the main thread). Its outcome,
    or the error that stopped it, is handed to the main thread by `result`."""

    def __init__(self, executor: Executor, targets: Sequence[Task]):
        super().__init__(name="behaviorc-build", daemon=True)
        self.executor = executor
        self.targets = targets
        self.outcome: BuildOutcome | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = self.executor.run(self.targets)
        except BaseException as err:  # raised again on the main thread, reported there
            self.error = err

    def result(self) -> BuildOutcome:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


def _build_with_dashboard(out: Path, targets: list[Task], cancel: CancelSignal, settings: dict) -> int:
    from behaviorc.tui.app import Dashboard

    thread = BuildThread(Executor(out, **settings), targets)
    thread.start()
    Dashboard(out, cancel=cancel.cancel, build_thread=thread).run()
    if thread.is_alive():  # quitting mid-build stops it
        cancel.cancel("the dashboard was closed")
        print("behaviorc: stopping the build at the running task's next checkpoint "
              "(Ctrl-C to stop at once)", file=sys.stderr)
    outcome = thread.result()
    _print_outcome(outcome, out)
    return outcome.exit_code


def _print_outcome(outcome: BuildOutcome, out: Path) -> None:
    _print_replies(outcome)
    _print_reply_tables(outcome)
    _publish_results(outcome, out)
    for record in outcome.failed:
        print(f"\ntask {record.task.id} failed:\n{record.error}", file=sys.stderr)
    for verdict in outcome.unmet:
        print(f"\n{verdict.render()}", file=sys.stderr)
    for record in outcome.records:
        for warning in (record.result.data.get("warnings", []) if record.result else []):
            print(f"warning: {record.task.id}: {warning}", file=sys.stderr)
    summary = ", ".join(f"{n} {status}" for status, n in count_statuses(outcome.records).items())
    if outcome.cancelled:
        print(f"behaviorc: stopped ({summary}); finished tasks are kept, build again to resume",
              file=sys.stderr)
    else:
        verdict = "built" if outcome.ok else "build failed"
        print(f"{verdict}: {summary}; report: {outcome.report_path}",
              file=sys.stdout if outcome.ok else sys.stderr)


def _print_replies(outcome: BuildOutcome) -> None:
    """The sample replies tasks recorded (a distillation: base, steered, trained), so a
    person reads what the behavior changed beside the margins."""
    for record in outcome.records:
        rows = (record.result.data.get("replies") if record.result else None) or []
        if not rows:
            continue
        metrics = record.result.metrics
        margins = "  ".join(f"{name}={metrics[name]:.3f}" for name in
                            ("margin_before", "margin_steered", "margin_after", "steered_share")
                            if name in metrics)
        print(f"\nreplies of {record.task.id} (greedy; {margins})")
        for row in rows:
            print(f"  prompt: {row['prompt']}")
            for model, text in row.items():
                if model != "prompt":
                    print(f"    {model + ':':<9} {' '.join(text.split())}")


def _print_reply_tables(outcome: BuildOutcome) -> None:
    """Each behavior's reply table: what its models say, scored, beside the prompt."""
    for record in outcome.records:
        data = record.result.data if record.result else {}
        if "rows" not in data or "verdict" not in data:
            continue
        rows = data["rows"]
        answered = rows[0]["replies"] if rows else 0
        print(f"\nreply table of {record.task.name} (scored by {data['scorer']}; {answered} replies "
              "per model; 95% intervals over prompts)")
        for line in reply_table_lines(data):
            print(line)


# --- clean, dash ------------------------------------------------------------------------

def run_clean(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    if outputs.owned(folder) is None:
        raise BehaviorError(f"{folder} is not a build folder (no {outputs.manifest_path(folder)}, "
                            "the record of what builds wrote there)",
                            hint="pass the --out folder of a build; remove other folders by hand")
    if args.unused:
        return clean_unused(folder)
    store = Store(folder / STORE_DIR)
    store.acquire()  # refuses while a build runs there, and keeps one from starting
    try:
        kept = outputs.remove(folder)
        shutil.rmtree(folder / STORE_DIR)
    finally:
        store.release()
    if kept:
        print(f"removed the build in {folder}; kept what builds did not write: {', '.join(kept[:5])}"
              + (f" and {len(kept) - 5} more" if len(kept) > 5 else ""))
    else:
        folder.rmdir()
        print(f"removed the build in {folder}")
    return 0


def clean_unused(folder: Path) -> int:
    """Remove the stored results whose keys no task in the last report has."""
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
        used = {task["key"] for task in report["tasks"]}
    except FileNotFoundError:
        raise BehaviorError(f"{folder} has no {REPORT_FILE}: nothing says which results the last "
                            "build used", hint="build into it first, or remove everything with "
                            "`behaviorc clean DIR`") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BehaviorError(f"{folder / REPORT_FILE} cannot be read ({err})",
                            hint="`behaviorc clean DIR` removes the whole build") from None
    store = Store(folder / STORE_DIR)
    store.acquire()
    try:
        removed, freed = store.remove_unused(used)
        kept = len(store.keys())
    finally:
        store.release()
    print(f"removed {removed} stored result(s) the last build did not use "
          f"({freed / 1e6:.1f} MB); kept {kept}")
    return 0


def run_dash(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    if not (folder / EVENTS_FILE).exists():
        raise BehaviorError(f"no build in {folder} (no {EVENTS_FILE})",
                            hint="start one with `behaviorc build SPEC --out DIR`, or use --tui")
    from behaviorc.tui.app import Dashboard

    def request_cancel() -> None:
        (folder / CANCEL_FILE).write_text("requested by behaviorc dash\n")

    Dashboard(folder, cancel=request_cancel).run()
    return 0
