"""Shared vocabulary of every stage: locations and errors, the IR, task base, metric names, events, atomic files."""
