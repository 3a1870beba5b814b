"""`behaviorc experiment NAME SPEC [options]`: one command per open question."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

EXPERIMENT_MODULES = (
    "behaviorc.lab.sample_efficiency",
    "behaviorc.lab.gdn_state",
    "behaviorc.lab.steer_complexity",
    "behaviorc.lab.lr_sweep",
    "behaviorc.lab.backward_transfer",
)

DESCRIPTION = """\
Answer one of the research's open questions on a spec's behavior, with numbers and
their uncertainty. Each point (a training run, a measurement) runs through the build
executor: finished points are stored in the result folder, so a stopped experiment
resumes and a rerun reuses them; `behaviorc dash DIR` shows it while it runs.
Independent points run side by side in worker processes (--jobs), each on one torch
thread: a point's numbers are the same whatever --jobs is.

The folder gets results.json, PNG plots and summary.md (the answer in words).
On the testbed model (`model base = "tiny-gdn-testbed"`) behaviors are also measured as
the rate at which sampled generations show them, scored exactly. A real model's replies
have no exact scorer: there (smollm2-135m, specs/real_experiments.behavior) a point is
measured by the behavior's margin on its eval pairs, and summary.md says so. A margin,
like the general NLL, is computed, not sampled: its interval comes from the spread
between training seeds alone, so experiments reading one take --seeds 2 or more.

What the default grids cost (3 seeds a point): sample-efficiency trains 9 models,
lr-sweep 12, backward-transfer 6, gdn-state 6; steer-complexity trains none (5 strengths
x 2 behaviors, measured). On smollm2-135m (specs/real_experiments.behavior: 30 steps,
batch 4) a training point took 1 to 6 minutes on a shared 2-core machine, with the load,
and the default grids ran 3 (steer-complexity) to 23 (lr-sweep) minutes: see the README.
For a first look use --seeds 2 and two grid points (--grid 1,14, --lrs 3e-5,1e-4).
"""

EPILOG = """\
examples:
  behaviorc experiment sample-efficiency specs/testbed_listen.behavior
  behaviorc experiment sample-efficiency specs/real_experiments.behavior --seeds 2 --grid 1,14
  behaviorc experiment lr-sweep specs/testbed_listen.behavior --lrs 1e-5,3e-5,1e-4
  behaviorc experiment backward-transfer specs/testbed_listen.behavior --mix 0.25
  behaviorc experiment gdn-state specs/testbed_listen.behavior
  behaviorc experiment steer-complexity specs/testbed_listen.behavior --simple concise --complex listen
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment", help="run one of the five experiments on a spec's behavior",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = parser.add_subparsers(dest="experiment", metavar="NAME")
    for module_name in EXPERIMENT_MODULES:
        module = importlib.import_module(module_name)
        sub = names.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                               epilog=module.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_options(sub)
        sub.add_argument("--jobs", default="auto", metavar="N",
                         help="points to run at once, each in a worker process (default auto: one "
                              "per usable core, while free memory holds another)")
        sub.set_defaults(run=lambda args, module=module: run_experiment(module, args))
    parser.set_defaults(run=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_experiment(module, args: argparse.Namespace) -> int:
    from behaviorc.lab.common import Stopped, write_results
    from behaviorc.pipeline.parallel import Jobs

    spec: Path = args.spec
    args.jobs = Jobs.parse(args.jobs)
    args.out = args.out or Path("out") / "experiments" / f"{module.NAME}-{spec.stem}"
    try:
        results = module.run(args)
    except Stopped:
        print(f"behaviorc: experiment stopped; finished points are kept in {args.out}, "
              "run it again to resume")
        return 130
    written = write_results(args.out, results, module.summary(results), module.plots(results))
    print(module.summary(results))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0

