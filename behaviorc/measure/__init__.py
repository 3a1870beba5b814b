"""Measurements every task reports through: behavior margin (margin.py), general NLL
(nll.py) and the default general texts (general.py)."""
