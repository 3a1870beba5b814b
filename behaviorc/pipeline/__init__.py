"""A build: lowering a checked spec to a plan, the executor, its store, report and command line."""
