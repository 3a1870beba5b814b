"""Distillation: train a behavior's steering into the weights, then remove it, optionally
handing a live server over from steering to weights while training runs."""
