"""Running a plan: `behaviorc build`, `clean` and `dash`.

    executor.py  Executor(out).run(tasks) -> BuildOutcome: order, cache, fail, cancel
    store.py     the content-addressed store under <out>/.store/ (atomic, verified)
    context.py   RunContext (what a task sees), EnginePool, CancelSignal
    events.py    <out>/events.jsonl and the event vocabulary
    report.py    <out>/report.json
    expect.py    judging a spec's `expect` lines against the measured metrics
    state.py     a build's state folded from its events (terminal progress, dashboard)
    progress.py  the rich progress display
    commands.py  the CLI subcommands
"""
