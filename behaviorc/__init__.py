"""behaviorc: a compiler for .behavior specs."""

__version__ = "0.1.0"
