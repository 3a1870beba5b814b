"""Measurements every task reports through: behavior margin and general NLL."""

from behaviorc.measure.general import DEFAULT_GENERAL_TEXTS
from behaviorc.measure.margin import behavior_margin, per_pair_margins
from behaviorc.measure.nll import general_nll

__all__ = ["DEFAULT_GENERAL_TEXTS", "behavior_margin", "general_nll", "per_pair_margins"]
