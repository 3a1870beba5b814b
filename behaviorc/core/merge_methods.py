"""The merge methods by name, what each does and takes: the vocabulary the language checks
a `merge` setting against and `behaviorc.compose.merge` runs. Also the mergekit 0.1.5
methods and settings behaviorc refuses, each with why and what to write instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

Sparsifier = Literal["magnitude", "random", "della", "outliers"]
# How the (sparsified) vectors are mixed: a weighted sum, TIES's sign election, or a
# factor per term (per tensor, row or column) found from the vectors' inner products.
Mixing = Literal["sum", "consensus", "stock", "slerp", "nuslerp", "multislerp", "karcher"]
# Settings a term may override inside `merge { term NAME { ... } }` (mergekit's
# per-model parameters; a term's weight is its coefficient in the expression).
PER_TERM = ("density", "epsilon", "gamma")


@dataclass(frozen=True)
class MethodTraits:
    """How a method sparsifies and mixes, with mergekit 0.1.5's defaults."""

    sparsify: Sparsifier | None = None
    mix: Mixing = "sum"
    normalize: bool = False  # default: divide by the (agreeing) weights
    rescale: bool = False  # default: restore each sparsified tau's L1 norm
    # It mixes the models' weights (base + tau_i), not the task vectors: the base's own
    # factor in the result need not be 1.
    on_weights: bool = False
    weighted: bool = True  # the terms' weights enter (else mergekit takes no weights)
    min_terms: int = 1
    max_terms: int | None = None

    @property
    def consensus(self) -> bool:
        return self.mix == "consensus"

    @property
    def stock(self) -> bool:
        return self.mix == "stock"

    @property
    def task_arithmetic(self) -> bool:
        """mergekit's generalized task arithmetic: sparsify, weight, sum or elect."""
        return self.mix in ("sum", "consensus") and not self.on_weights

    @property
    def settings(self) -> tuple[str, ...]:
        """The merge settings the method takes."""
        if not self.task_arithmetic:
            return {"sum": ("normalize",), "stock": ("filter_wise",), "slerp": ("t",),
                    "nuslerp": ("flatten", "row_wise"), "multislerp": ("normalize", "eps"),
                    "karcher": ("max_iter", "tol")}[self.mix]
        names = ["lambda", "normalize"]
        if self.sparsify is not None:
            names += ["density", "rescale"]
        if self.sparsify in ("random", "della"):
            names.append("seed")
        names += {"della": ["epsilon"], "outliers": ["gamma"]}.get(self.sparsify, [])
        return tuple(names)


METHODS: dict[str, MethodTraits] = {
    "task_arithmetic": MethodTraits(),
    "ties": MethodTraits("magnitude", "consensus", normalize=True),
    "dare_linear": MethodTraits("random", rescale=True),
    "dare_ties": MethodTraits("random", "consensus", rescale=True),
    "della": MethodTraits("della", "consensus", normalize=True, rescale=True),
    "della_linear": MethodTraits("della", rescale=True),
    "breadcrumbs": MethodTraits("outliers"),
    "breadcrumbs_ties": MethodTraits("outliers", "consensus"),
    "model_stock": MethodTraits(mix="stock", weighted=False, min_terms=2),
    "linear": MethodTraits(normalize=True, on_weights=True),
    "slerp": MethodTraits(mix="slerp", on_weights=True, weighted=False, max_terms=2),
    "nuslerp": MethodTraits(mix="nuslerp", min_terms=2, max_terms=2),
    "multislerp": MethodTraits(mix="multislerp", normalize=True),
    "karcher": MethodTraits(mix="karcher", on_weights=True, weighted=False),
}
# The catalog is where the method names are written, each beside its traits; the IR's
# type is taken from it (checked at run time, by pydantic: a type checker cannot read a
# Literal built from values).
MergeMethod = Literal[tuple(METHODS)]  # type: ignore[valid-type]
ALIASES = {"dare": "dare_linear"}
METHOD_NAMES = (*METHODS, *ALIASES)
DEFAULT_EPSILON, DEFAULT_GAMMA = 0.15, 0.01  # mergekit's
# mergekit's defaults of the other methods' settings (slerp's t has none: it is required).
DEFAULT_MAX_ITER, DEFAULT_TOL, DEFAULT_EPS = 10, 1e-5, 1e-8

# mergekit 0.1.5's other methods: why behaviorc has none, and what to write instead.
REFUSED_METHODS = {
    "passthrough": ("copies one model's tensors (with `slices`, to stack layers of "
                    "different models); behaviorc composes task vectors of one architecture",
                    "use a fine-tuned folder as it is: `behavior NAME from model \"DIR\"`"),
    "sce": ("is not implemented (variance-selected entries weighted by their squared norms)",
            "`merge ties` or `merge dare_ties` elect signs the same way"),
    "ram": ("is not implemented (Reinforced Agent Merging)",
            "`merge ties` keeps what the models agree on"),
    "ramplus_tl": ("is not implemented (Reinforced Agent Merging Plus)",
                   "`merge ties` keeps what the models agree on"),
    "nearswap": ("is not implemented (takes the second model where it is near the base)",
                 "`merge slerp { t 0.5 }` or `merge linear` interpolate the two"),
    "arcee_fusion": ("is not implemented (importance-masked fusion of two models)",
                     "`merge della` keeps the larger entries more often"),
}
# mergekit settings behaviorc refuses, with why.
REFUSED_SETTINGS = {
    "int8_mask": ("only makes mergekit hold its masks in int8 to save memory; the result "
                  "is the same, and behaviorc's masks are already bits or bytes",
                  "remove it"),
    "weight": ("is the term's coefficient in the expression",
               "write the weight there: `listen * 0.3`"),
}


def merge_setting_problem(method: str, density: float, epsilon: float, gamma: float) -> str:
    """What is wrong with a method's numeric settings (the merge's or one term's), or ""
    (the language and the options share these rules)."""
    if not 0 <= density <= 1:
        return f"density {density:g} is outside [0, 1]"
    traits = METHODS[method]
    if traits.sparsify == "della" and 0 < density < 1 and not (
            0 < density - epsilon and density + epsilon < 1):
        return (f"epsilon {epsilon:g} puts della's keep probabilities, density ± epsilon, "
                f"outside (0, 1) (density {density:g})")
    if traits.sparsify == "outliers" and not 0 <= gamma < 1:
        return f"gamma {gamma:g} is outside [0, 1)"
    return ""


def terms_problem(method: str, weights: Sequence[float], normalizes: bool
                  ) -> tuple[str, str] | None:
    """What is wrong with a method's terms (their number and weights), with a hint, or
    None (shared by the language and `behaviorc merge`)."""
    traits = METHODS[method]
    count = len(weights)
    if count < traits.min_terms or (traits.max_terms is not None and count > traits.max_terms):
        wanted = {(2, None): "two or more behaviors", (2, 2): "exactly two behaviors",
                  (1, 2): "one behavior (from the base) or two (from one to the other)"
                  }.get((traits.min_terms, traits.max_terms), "at least one behavior")
        return (f"`{method}` takes {wanted}, not {count}",
                {"model_stock": "weight fewer models with task_arithmetic or ties",
                 "nuslerp": "`merge slerp` goes from the base to one behavior"}.get(
                     method, "`merge multislerp` or `merge karcher` take any number"))
    if not traits.weighted and any(w < 0 for w in weights):
        return (f"`{method}` takes no weights (each model counts once, as in mergekit), "
                "so it cannot subtract a behavior",
                "subtract with task_arithmetic, ties or linear")
    if traits.on_weights and traits.mix == "sum" and normalizes and abs(sum(weights)) < 1e-8:
        return ("`linear` divides by the sum of the weights, which is 0 here",
                "write `normalize off`, or task_arithmetic to add and subtract vectors")
    if traits.mix == "multislerp" and normalizes and abs(sum(weights)) < 1e-8:
        return ("`multislerp` divides by the sum of the weights, which is 0 here",
                "write `normalize off`")
    return None


def ignores_weights(method: str, weights: Sequence[float]) -> bool:
    """Whether the composition gives weights the method does not use (a warning)."""
    return not METHODS[method].weighted and any(w != 1 for w in weights)
