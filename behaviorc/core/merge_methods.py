"""The merge methods by name, what each does and takes: the vocabulary the language checks
a `merge` setting against and `behaviorc.compose.merge` runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Sparsifier = Literal["magnitude", "random", "della", "outliers"]


@dataclass(frozen=True)
class MethodTraits:
    """How a method sparsifies and mixes, with mergekit 0.1.5's defaults."""

    sparsify: Sparsifier | None
    consensus: bool  # TIES's sign election
    normalize: bool  # default: divide by the (agreeing) weights
    rescale: bool = False  # default: restore each sparsified tau's L1 norm
    stock: bool = False  # Model Stock instead of task arithmetic

    @property
    def settings(self) -> tuple[str, ...]:
        """The merge settings the method takes."""
        if self.stock:
            return ()
        names = ["lambda", "normalize"]
        if self.sparsify is not None:
            names.append("density")
        if self.sparsify in ("random", "della"):
            names += ["rescale", "seed"]
        names += {"della": ["epsilon"], "outliers": ["gamma"]}.get(self.sparsify, [])
        return tuple(names)


METHODS: dict[str, MethodTraits] = {
    "task_arithmetic": MethodTraits(None, consensus=False, normalize=False),
    "ties": MethodTraits("magnitude", consensus=True, normalize=True),
    "dare_linear": MethodTraits("random", consensus=False, normalize=False, rescale=True),
    "dare_ties": MethodTraits("random", consensus=True, normalize=False, rescale=True),
    "della": MethodTraits("della", consensus=True, normalize=True, rescale=True),
    "della_linear": MethodTraits("della", consensus=False, normalize=False, rescale=True),
    "breadcrumbs": MethodTraits("outliers", consensus=False, normalize=False),
    "breadcrumbs_ties": MethodTraits("outliers", consensus=True, normalize=False),
    "model_stock": MethodTraits(None, consensus=False, normalize=False, stock=True),
}
ALIASES = {"dare": "dare_linear"}
METHOD_NAMES = (*METHODS, *ALIASES)
DEFAULT_EPSILON, DEFAULT_GAMMA = 0.15, 0.01  # mergekit's


def merge_setting_problem(method: str, density: float, epsilon: float, gamma: float) -> str:
    """What is wrong with a method's numeric settings, or "" (the language and the
    options share these rules)."""
    if not 0 < density <= 1:
        return f"density {density:g} is outside (0, 1]"
    traits = METHODS[method]
    if traits.sparsify == "della" and density < 1 and not (
            0 < density - epsilon and density + epsilon < 1):
        return (f"epsilon {epsilon:g} puts della's keep probabilities, density ± epsilon, "
                f"outside (0, 1) (density {density:g})")
    if traits.sparsify == "outliers" and not 0 <= gamma < 1:
        return f"gamma {gamma:g} is outside [0, 1)"
    return ""
