"""The .behavior language: parse, check, format.

    spec = load_spec("specs/listen.behavior")          # ir.Spec, or BehaviorError
    spec, diagnostics = check_file("specs/listen.behavior")  # warnings too
"""

from behaviorc.lang.check import check_file, check_text, load_spec

__all__ = ["check_file", "check_text", "load_spec"]
