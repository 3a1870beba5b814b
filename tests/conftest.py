"""Shared fixtures: the built-in tiny models, built once into the user's cache."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_gdn() -> Path:
    from behaviorc.model.builtin import ensure_builtin
    return ensure_builtin("tiny-gdn")


@pytest.fixture(scope="session")
def tiny_dense() -> Path:
    from behaviorc.model.builtin import ensure_builtin
    return ensure_builtin("tiny-dense")
