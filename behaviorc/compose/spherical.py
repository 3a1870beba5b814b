"""The merge methods whose result is a combination of the models' vectors with factors
found from the vectors' inner products: Model Stock, SLERP, NuSLERP, Multi-SLERP and the
Karcher mean, as mergekit 0.1.5 defines them.

mergekit normalizes whole tensors (or rows, or columns), measures angles between them
and interpolates, but every vector it builds stays in the span of its inputs: each result
is sum_i c_i x_i, the x_i being the task vectors (or, for `slerp` and `karcher`, the
models' weights, base + tau_i), and the c_i depend only on the Gram matrix
G_ij = <x_i, x_j>. So behaviorc sums each parameter's Gram matrix in one pass (float32
products per piece, summed in float64), finds the c_i from it in float64 (a few numbers
per tensor, not tensors), and then merges piece by piece as a weighted sum.

- model_stock (Jang et al. 2024): cos the mean pairwise cosine of the N task vectors,
  t = N cos / (1 + (N - 1) cos) (0 where the denominator is within 1e-6 of 0), result
  base + t * mean_i(tau_i); `filter_wise`: a cos and t per row (last axis) instead.
- slerp: between the base and base + tau (one term) or base + tau_1 and base + tau_2
  (two): theta the angle between the two weight tensors, c = sin((1 - t) theta) /
  sin(theta) and sin(t theta) / sin(theta); plain (1 - t, t) where |cos| > 0.9995.
- nuslerp: the same between tau_1 and tau_2, t = w_2 / (w_1 + w_2) (0.5 where that sum
  is within 1e-6 of 0), plain where 1 - cos^2 <= 1e-16; per whole tensor (`flatten`, the
  default), else per row, or (`row_wise`) per column.
- multislerp (Goddard): each tau_i as a unit vector u_i; their weighted mean m, made a
  unit vector; the weighted mean of the u_i's components tangent to m, carried back onto
  the sphere (exp map at m), times the weighted mean norm.
- karcher: the Karcher mean of the models' weights on the unit sphere (equal shares,
  up to `max_iter` gradient steps, `tol`), times their mean norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol

import numpy as np

from behaviorc.core.diagnostics import BehaviorError
from behaviorc.core.merge_methods import MethodTraits


class MergeOptions(Protocol):
    """What these methods read of behaviorc.compose.merge.MergeOptions."""

    traits: MethodTraits
    normalizes: bool
    t: float | None
    flatten: bool
    row_wise: bool
    filter_wise: bool
    max_iter: int
    tol: float
    eps: float

# The vectors a method normalizes: the whole tensor, each row (its last axis), or each
# column (its first axis). A 1-D tensor is one vector whatever the method says.
Along = Literal["tensor", "rows", "columns"]
_SLERP_LINEAR_ABOVE = 0.9995  # mergekit's slerp: |cos| above this interpolates linearly


def along(options: MergeOptions, shape: tuple[int, ...]) -> Along:
    """Which vectors of a parameter of this shape the method normalizes."""
    if len(shape) < 2:
        return "tensor"
    if options.traits.stock and options.filter_wise:
        return "rows"
    if options.traits.mix == "nuslerp" and not options.flatten:
        return "columns" if options.row_wise else "rows"
    return "tensor"


def vector_length(shape: tuple[int, ...], direction: Along) -> int:
    """Entries per row (rows) or per stored row of the (first axis, rest) matrix (columns):
    how a piece of whole rows reshapes to (-1, this)."""
    count = int(np.prod(shape, dtype=np.int64))
    if direction == "rows":
        return shape[-1]
    if direction == "columns":
        return count // shape[0]
    return count


class GramSums:
    """The Gram matrices of a parameter's vectors (one per tensor, row or column), summed
    piece by piece: index 0 the base (on-weights methods only), then every term of the
    composition by position (a term without the parameter has tau 0)."""

    def __init__(self, direction: Along, length: int, vectors: int, slots: list[int],
                 size: int):
        self.direction, self.length, self.slots = direction, length, slots
        self._upper = np.zeros((vectors, size, size))

    def add(self, offset: int, pieces: list[np.ndarray]) -> None:
        """Add one piece: `pieces` flat, in the order of `slots`. (Products in float32,
        summed in float64 by numpy's reduction, whose order depends only on positions:
        a BLAS dot's rounding depends on the arrays' alignment in memory, and so would
        the merge.)"""
        products = np.empty(pieces[0].size, np.float32)
        rows = pieces[0].size // self.length
        for a, first in enumerate(pieces):
            for b in range(a, len(pieces)):
                i, j = sorted((self.slots[a], self.slots[b]))
                np.multiply(first, pieces[b], out=products)
                if self.direction == "tensor":
                    self._upper[0, i, j] += float(np.add.reduce(products, dtype=np.float64))
                    continue
                matrix = products.reshape(rows, self.length)
                if self.direction == "rows":
                    start = offset // self.length
                    self._upper[start:start + rows, i, j] += np.add.reduce(
                        matrix, axis=1, dtype=np.float64)
                else:
                    self._upper[:, i, j] += np.add.reduce(matrix, axis=0, dtype=np.float64)

    @property
    def gram(self) -> np.ndarray:
        """(vectors, size, size) float64."""
        upper = self._upper
        diagonal = np.einsum("vii->vi", upper)
        full = upper + upper.transpose(0, 2, 1)
        np.einsum("vii->vi", full)[...] = diagonal
        return full


@dataclass
class Mix:
    """Per term present, the factor on its tau, and the base's factor in the merged delta
    (None: 0); each per vector (`direction`, `length` as in vector_length)."""

    direction: Along
    length: int
    terms: np.ndarray  # (terms present, vectors) float32
    base: np.ndarray | None  # (vectors,) float32

    def apply(self, deltas: list[np.ndarray], base: np.ndarray | None, offset: int
              ) -> np.ndarray:
        """The merged delta over one piece (consumes the deltas)."""
        total = deltas[0]
        for index, delta in enumerate(deltas):
            self._scale(delta, self.terms[index], offset)
            if index:
                total += delta
        if self.base is not None:
            if base is None:
                raise AssertionError("an on-weights mix needs the base's values")
            scaled = base.copy()
            self._scale(scaled, self.base, offset)
            total += scaled
        return total

    def _scale(self, piece: np.ndarray, factors: np.ndarray, offset: int) -> None:
        if self.direction == "tensor":
            piece *= factors[0]
            return
        matrix = piece.reshape(-1, self.length)  # a view: pieces are whole rows
        if self.direction == "rows":
            start = offset // self.length
            matrix *= factors[start:start + matrix.shape[0], None]
        else:
            matrix *= factors[None, :]


def with_base(options: MergeOptions) -> bool:
    return options.traits.on_weights


def mix_of(options: MergeOptions, sums: GramSums, weights: list[float], present: list[int],
           name: str) -> Mix:
    """The factors of the method over one parameter, from its Gram sums; `weights` are
    every term's (by position), `present` the positions of the terms that have it."""
    gram = sums.gram
    method = options.traits.mix
    count = len(weights)
    if method == "stock":
        factors = _stock(gram, count)
    elif method == "slerp":
        factors = _slerp(gram, options.t, count)
    elif method == "nuslerp":
        factors = _nuslerp(gram, weights)
    elif method == "multislerp":
        factors = _multislerp(gram, weights, options.normalizes, options.eps, name)
    else:
        factors = _karcher(gram, options.max_iter, options.tol)
    base = None
    if with_base(options):
        # sum_i c_i x_i with x_0 the base and x_i = base + tau_i is base + the delta
        # (sum_i c_i - 1) base + sum_i c_i tau_i.
        base_factor = factors.sum(axis=1) - 1
        base_factor[np.abs(base_factor) < 1e-9] = 0
        factors = factors[:, 1:]
        if np.any(base_factor):
            base = base_factor.astype(np.float32)
    return Mix(sums.direction, sums.length, factors[:, present].T.astype(np.float32).copy(),
               base)


def _on_weights(gram: np.ndarray) -> np.ndarray:
    """The Gram matrix of [base, base + tau_1, ...] from that of [base, tau_1, ...]."""
    size = gram.shape[-1]
    change = np.eye(size)
    change[1:, 0] = 1
    return change @ gram @ change.T


def _stock(gram: np.ndarray, count: int) -> np.ndarray:
    norms = np.sqrt(np.maximum(np.diagonal(gram, axis1=1, axis2=2), 0))
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    cosines = [np.clip(gram[:, i, j] / np.maximum(norms[:, i] * norms[:, j], 1e-6), -1, 1)
               for i, j in pairs]
    cos = np.mean(cosines, axis=0)
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6  # no finite estimate: the base, as mergekit
    t = np.where(singular, 0.0, count * cos / np.where(singular, 1.0, denominator))
    return np.repeat((t / count)[:, None], count, axis=1)


def _norms(gram: np.ndarray, first: int, second: int) -> tuple[np.ndarray, np.ndarray]:
    norms = np.sqrt(np.maximum(np.diagonal(gram, axis1=1, axis2=2), 0))
    return norms[:, first], norms[:, second]


def _interpolate(cos: np.ndarray, t: float, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    theta = np.arccos(np.where(linear, 0.0, cos))
    sine = np.where(linear, 1.0, np.sin(theta))
    first = np.where(linear, 1 - t, np.sin((1 - t) * theta) / sine)
    second = np.where(linear, t, np.sin(t * theta) / sine)
    return first, second


def _slerp(gram: np.ndarray, t: float, count: int) -> np.ndarray:
    gram = _on_weights(gram)
    first, second = (0, 1) if count == 1 else (1, 2)
    a, b = _norms(gram, first, second)
    a, b = np.where(a > 1e-8, a, 1.0), np.where(b > 1e-8, b, 1.0)
    cos = np.clip(gram[:, first, second] / (a * b), -1, 1)
    factors = np.zeros(gram.shape[:2])
    factors[:, first], factors[:, second] = _interpolate(cos, t, np.abs(cos) > _SLERP_LINEAR_ABOVE)
    return factors


def _nuslerp(gram: np.ndarray, weights: list[float]) -> np.ndarray:
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    a, b = _norms(gram, 0, 1)
    a, b = np.maximum(a, 1e-7), np.maximum(b, 1e-7)
    cos = np.clip(gram[:, 0, 1] / (a * b), -1, 1)
    factors = np.zeros(gram.shape[:2])
    factors[:, 0], factors[:, 1] = _interpolate(cos, t, 1 - cos * cos <= 1e-16)
    return factors


def _multislerp(gram: np.ndarray, weights: list[float], normalize: bool, eps: float,
                name: str) -> np.ndarray:
    matrix = gram[0]
    count = len(weights)
    if count == 1:  # one model: itself
        return np.ones((1, 1))
    w = np.array(weights, np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(matrix), 0))
    scale = norms + eps  # u_i = x_i / (|x_i| + eps)
    units = matrix / np.outer(scale, scale)  # the Gram matrix of the u_i
    mean_norm = _norm(units, w)
    if mean_norm < eps:
        if count == 2:  # mergekit falls back to the linear mix
            return w[None, :]
        raise BehaviorError(f"multislerp: the weighted mean direction of `{name}` is 0 "
                            "(opposite vectors whose weights cancel)",
                            hint="change the weights so that they do not cancel")
    mean = w / mean_norm  # m, over the u_i
    dots = units @ mean  # <u_i, m>
    tangent = w - (w @ dots) * mean  # sum_i w_i (u_i - <u_i, m> m)
    length = _norm(units, tangent) + eps
    on_sphere = mean * np.cos(length) + tangent * (np.sin(length) / length)
    factors = on_sphere * float(norms @ w) / scale
    return factors[None, :]


def _karcher(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    matrix = _on_weights(gram)[0]
    count = matrix.shape[0] - 1
    factors = np.zeros((1, count + 1))
    if count == 1:
        factors[0, 1] = 1
        return factors
    norms = np.sqrt(np.maximum(np.diag(matrix)[1:], 0))
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:  # every model is (nearly) zero: so is their mean, as in mergekit
        return factors
    units = matrix[1:, 1:] / np.outer(np.where(norms > 0, norms, 1), np.where(norms > 0, norms, 1))
    share = np.zeros(count)
    share[valid] = 1 / len(valid)
    mean = share.copy()
    length = _norm(units, mean)
    if length < tol:
        mean = np.eye(count)[valid[0]]
    else:
        mean /= length
    for _ in range(max_iter):
        dots = np.clip(units @ mean, -1, 1)
        tangent = np.zeros(count)
        for i in valid:
            theta = float(np.arccos(dots[i]))
            if theta < tol:
                continue
            step = share[i] * theta / np.sin(theta)
            tangent[i] += step
            tangent -= step * dots[i] * mean
        length = _norm(units, tangent)
        if length < tol:
            break
        mean = np.cos(length) * mean + np.sin(length) * tangent / length
        size = _norm(units, mean)
        if size > tol:
            mean /= size
    scale = float(norms.sum()) / count  # sum_i (1 / N) |x_i|
    factors[0, 1:] = scale * mean / np.where(norms > 0, norms, 1)
    return factors


def _norm(gram: np.ndarray, coefficients: np.ndarray) -> float:
    """|sum_i c_i v_i| from the v_i's Gram matrix."""
    return float(np.sqrt(max(coefficients @ gram @ coefficients, 0.0)))


def gram_sums(options: MergeOptions, shape: tuple[int, ...], term_indices: list[int],
              term_count: int, parts: Iterable[tuple[int, np.ndarray, list[np.ndarray]]]
              ) -> GramSums:
    """The Gram sums of a parameter of `shape` over `parts` ((offset, base, taus of the
    terms at `term_indices`) pieces, in any order)."""
    direction = along(options, shape)
    length = vector_length(shape, direction)
    count = int(np.prod(shape, dtype=np.int64))
    vectors = {"tensor": 1, "rows": count // max(length, 1), "columns": length}[direction]
    base = with_base(options)
    sums = GramSums(direction, length, vectors,
                    ([0] if base else []) + [int(base) + i for i in term_indices],
                    term_count + int(base))
    for offset, base_values, deltas in parts:
        sums.add(offset, ([base_values] if base else []) + list(deltas))
    return sums
