"""Lowering the checked spec to a Plan: a DAG of frozen, hashable tasks."""
