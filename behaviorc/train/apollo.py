"""APOLLO: AdamW-like updates with SGD-like optimizer memory (arXiv 2412.05270).

Written from the paper's Algorithm 1, not from its (CC-BY-NC) reference code.

AdamW scales every gradient element by its own factor. APOLLO coarsens that to one
factor per channel (or per tensor for APOLLO-Mini) and estimates those factors from Adam
moments kept in a random rank-r projection of the gradient, so a matrix's state is
r x n instead of 2 x m x n.

For a matrix gradient G oriented as d x n, with d the SMALLER side (a tall weight is
handled through its transpose, so n is always the larger side and the projected
gradient is r x n):

    P    ~ N(0, 1/r), r x d, redrawn every `refresh` steps from a seed derived from
           (seed, parameter number, step // refresh): a resumed run redraws the same P
           and nothing about P is stored
    R    = P G                                  (r x n)
    M, V = Adam moments of R, bias-corrected to M^, V^
    R~   = M^ / (sqrt(V^) + eps)
    s_j  = ||R~[:, j]|| / ||R[:, j]||           channel-wise (APOLLO)
    s    = ||R~|| / ||R||                       tensor-wise (APOLLO-Mini, rank 1)
    U    = alpha * G diag(s)
    W   <- W - lr * U - lr * weight_decay * W   (decoupled weight decay)

Scale alpha. A column of R~ has r entries of magnitude ~1, a column of AdamW's scaled
gradient has d, while ||R[:, j]|| ~= ||G[:, j]|| (Johnson-Lindenstrauss). So s_j is about
sqrt(r/d) times AdamW's channel factor and alpha = sqrt(d / r) brings the update back to
AdamW's magnitude, which lets the same learning rates work (checked by a test: the first
update's RMS is AdamW's). In DESIGN.md's `alpha = sqrt(n/r)`, n is this d: the side the
projection compresses, the smaller one. The paper's code takes a hand-tuned `scale` with
alpha = sqrt(scale) (1 for APOLLO, 128 for APOLLO-Mini); pass `scale` to set alpha
directly instead of this default.

Cost: the projection is a dense r x d by d x n product per matrix and step (2 r d n
flops): at rank 256 it is ~85% of a step on one CPU core, and it runs at the BLAS's full
speed. Everything else is arranged around memory traffic, which is what costs on a CPU:
one matrix at a time (its r x n arrays stay in cache between passes), reused scratch
buffers instead of fresh temporaries (page faults on first touch), the projection kept
between refreshes rather than redrawn, and the update applied and measured in one pass
over G and W. The limiter stays on the device (no host sync per matrix on an
accelerator).

Memory beyond the state (scratch, never saved): the kept projection, r x d floats per
matrix (at most half of its state, as d <= n), and two buffers shared by all matrices:
r x n of the widest matrix, and a 4 MiB block of rows on a CPU (the largest matrix on an
accelerator).

Norm-growth limiter (gamma = 1.01): if ||U_t|| > gamma * ||U_{t-1}|| the update is shrunk
to gamma * ||U_{t-1}||; each activation is counted (`limiter_activations`).

Parameters that are not matrices, or whose smaller side is not larger than the rank
(A_log, dt_bias, conv1d weights [3-D], norms, fused MoE experts [3-D], small matrices),
get plain AdamW inside the same optimizer.

State per projected d x n matrix (`state_bytes`): exp_avg and exp_avg_sq, both r x n
float32 (2 * r * n * 4 bytes), `step` (int64, 8), `previous_norm` (float32, 4) and
`limited` (int64, 8): 2*r*n*4 + 20 bytes. AdamW-routed parameters hold the usual two
moments in the parameter's dtype plus `step`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal

import torch

Scaling = Literal["channel", "tensor"]


class APOLLO(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 256,
        refresh: int = 200,
        limiter: float | None = 1.01,
        scale: float | None = None,
        scaling: Scaling = "channel",
        seed: int = 0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1): {betas}")
        if rank < 1 or refresh < 1:
            raise ValueError("rank and refresh must be at least 1")
        if limiter is not None and limiter <= 1:
            raise ValueError(f"the limiter's gamma must be above 1: {limiter}")
        if scaling not in ("channel", "tensor"):
            raise ValueError(f"scaling must be 'channel' or 'tensor': {scaling}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        refresh=refresh, limiter=limiter, scale=scale, scaling=scaling, seed=seed)
        super().__init__(params, defaults)
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._projections: dict[torch.Tensor, tuple[tuple[int, ...], torch.Tensor]] = {}

    @classmethod
    def mini(cls, params: Iterable[Any], **options: Any) -> "APOLLO":
        """APOLLO-Mini: rank 1, one scaling factor per tensor."""
        return cls(params, **{"rank": 1, "scaling": "tensor", **options})

    # -- routing and accounting ------------------------------------------------------

    @staticmethod
    def is_projected(param: torch.Tensor, rank: int) -> bool:
        """Whether APOLLO (rather than AdamW) updates this parameter."""
        return param.ndim == 2 and min(param.shape) > rank

    @property
    def limiter_activations(self) -> int:
        """How many times, over all steps and matrices, the limiter shrank an update."""
        return sum(int(s["limited"]) for s in self.state.values() if "limited" in s)

    def state_bytes(self, param: torch.Tensor | None = None) -> int:
        """Bytes of optimizer state held for one parameter, or for all of them."""
        states = [self.state[param]] if param is not None else list(self.state.values())
        return sum(v.numel() * v.element_size() for s in states for v in s.values()
                   if isinstance(v, torch.Tensor))

    # -- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        number = 0  # a parameter's position over all groups: stable across a resume
        for group in self.param_groups:
            plain: list[torch.Tensor] = []
            projected: list[tuple[int, torch.Tensor]] = []
            for param in group["params"]:
                if param.grad is not None:
                    if param.grad.is_sparse:
                        raise RuntimeError("APOLLO does not support sparse gradients")
                    if self.is_projected(param, group["rank"]):
                        projected.append((number, param))
                    else:
                        plain.append(param)
                number += 1
            if plain:
                self._adamw(plain, group)
            if projected:
                self._apollo(projected, group)
        return loss

    def _adamw(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        grads = [p.grad for p in params]
        states = [self._init_adamw_state(p) for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = []
        for s in states:
            s["step"] += 1
            steps.append(int(s["step"]))

        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [math.sqrt(1 - beta2 ** t) for t in steps])
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators,
                                [-lr / (1 - beta1 ** t) for t in steps])

    def _init_adamw_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _apollo(self, numbered: list[tuple[int, torch.Tensor]], group: dict[str, Any]) -> None:
        # One matrix at a time: its projected gradient, moments and scaled moments (r x n
        # each) then stay in cache from one pass to the next, and one r x n workspace
        # serves every matrix. Batching across matrices (foreach) buys nothing here: each
        # matrix needs its own matmul anyway.
        for number, param in numbered:
            self._apollo_step(number, param, group)

    def _apollo_step(self, number: int, param: torch.Tensor, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, rank = group["lr"], group["eps"], group["rank"]
        tall = param.shape[0] > param.shape[1]
        grad = param.grad.float()
        oriented = grad.T if tall else grad  # d x n, d <= n
        side, channels = oriented.shape
        state = self._init_apollo_state(param, rank, channels)
        state["step"] += 1
        t = int(state["step"])

        projected = self._scratch("projected", rank * channels, param.device).view(rank, channels)
        torch.mm(self._projection(param, number, t - 1, group, side), oriented, out=projected)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(projected, 1 - beta1)
        projected_squares = projected.square_()  # R itself is no longer needed
        exp_avg_sq.lerp_(projected_squares, 1 - beta2)

        # s_j = ||R~[:, j]|| / ||R[:, j]|| with R~ = (M / bc1) / (sqrt(V / bc2) + eps)
        #                                        = (sqrt(bc2) / bc1) * M / (sqrt(V) + eps sqrt(bc2)):
        # the scalar goes onto the factors, and R~ / scalar is built in the workspace.
        # Column sums of squares, not column norms: summing over the rows of a row-major
        # matrix is vectorised, a norm over them is not (20x slower on this CPU).
        bias2 = math.sqrt(1 - beta2 ** t)
        channel_wise = group["scaling"] == "channel"
        projected_sums = _channel_sums(projected_squares, channel_wise)
        scaled = torch.sqrt(exp_avg_sq, out=projected).add_(eps * bias2)
        scaled_squares = torch.div(exp_avg, scaled, out=scaled).square_()
        tiny = torch.finfo(torch.float32).tiny
        factors = _channel_sums(scaled_squares, channel_wise).div_(projected_sums.clamp_min_(tiny)).sqrt_()
        factors.mul_(bias2 / (1 - beta1 ** t))

        # the factors index the channels of the oriented gradient: broadcast them onto G
        factors = factors.unsqueeze(1) if tall and channel_wise else factors.unsqueeze(0)

        # W <- W (1 - lr wd) - lr U: the update goes in at full size first, and its norm
        # comes out of the same pass over G; the limiter then takes back what exceeds
        # gamma times the previous norm. W - lr U + lr (1 - limit) U is W - lr limit U up
        # to rounding, and the limiter seldom acts in training (on gradient spikes; not
        # once in 30 steps on tiny-gdn at lr 1e-4), so most steps read G once here, not twice.
        alpha = group["scale"] if group["scale"] is not None else math.sqrt(side / rank)
        decay = 1 - lr * group["weight_decay"]
        update_norm = alpha * self._apply_update(param, grad, factors, decay, -lr * alpha)
        gamma = group["limiter"]
        if gamma is not None:
            # kept in tensors on the parameter's device: no host sync per matrix
            previous = state["previous_norm"]
            capped = (previous > 0) & (update_norm > gamma * previous)
            limit = torch.where(capped, gamma * previous / update_norm, 1.0)
            state["limited"] += capped
            update_norm = update_norm * limit
            # a CPU skips the correction when nothing was capped; an accelerator would
            # need a host sync to know, so it always takes it (a zero correction)
            if param.device.type != "cpu" or bool(capped):
                param.addcmul_(grad, factors * (1 - limit), value=lr * alpha)
        state["previous_norm"].copy_(update_norm)

    def _apply_update(self, param: torch.Tensor, grad: torch.Tensor, factors: torch.Tensor,
                      decay: float, step_size: float) -> torch.Tensor:
        """param <- decay * param + step_size * grad * factors (factors broadcast along
        rows or columns); returns ||grad * factors||. The product goes through a
        cache-sized block of rows at a time and is read back from cache for its norm and
        the weights: a full-size temporary would cost more than the arithmetic on a CPU
        (page faults on first touch, a write and a read of main memory). On an
        accelerator the block is the whole matrix, one kernel per op."""
        rows = grad.shape[0]
        if grad.device.type == "cpu":
            rows = max(1, _CPU_BLOCK_ELEMENTS // grad.shape[1])
        buffer = self._scratch("product", min(rows, grad.shape[0]) * grad.shape[1], grad.device)
        squares = []
        for start in range(0, grad.shape[0], rows):
            part = grad[start:start + rows]
            part_factors = factors if factors.shape[0] == 1 else factors[start:start + rows]
            flat = buffer[:part.numel()]
            product = torch.mul(part, part_factors, out=flat.view(part.shape))
            squares.append(torch.dot(flat, flat))  # a BLAS dot: faster than a norm here
            weights = param[start:start + rows]
            if decay != 1:
                weights.mul_(decay)
            weights.add_(product, alpha=step_size)
        return torch.stack(squares).sum().sqrt()

    def _scratch(self, purpose: str, numel: int, device: torch.device) -> torch.Tensor:
        """A reused float32 buffer of at least `numel` elements, one per purpose and device.
        Fresh temporaries cost more than the arithmetic on a CPU (page faults on first
        touch). Scratch, not state: never saved, and not in `state_bytes`."""
        key = (purpose, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, device=device, dtype=torch.float32)
        return buffer[:numel]

    def _projection(self, param: torch.Tensor, number: int, step: int, group: dict[str, Any],
                    side: int) -> torch.Tensor:
        """The r x d Gaussian projection for this parameter during this refresh period.

        It is drawn from a seed derived from (seed, parameter number, period), so a resumed
        run redraws the same matrix and nothing about it is stored, and it is kept between
        steps as scratch. Kept rather than redrawn each step: drawing costs about 5 ms per
        2048-wide matrix at rank 256 on one CPU core (~10% of a step), while keeping it costs
        r*d floats per matrix, at most half of the matrix's state (d <= n); the reference
        code keeps its projections too. The cache is checked against everything the
        matrix depends on, so a changed seed or rank (a loaded state dict) redraws it."""
        rank, period = group["rank"], step // group["refresh"]
        key = (group["seed"], number, period, rank, side)
        cached = self._projections.get(param)
        if cached is None or cached[0] != key:
            generator = torch.Generator(device=param.device)
            generator.manual_seed((group["seed"] * 1_000_003 + number) * 1_000_033 + period)
            matrix = torch.randn(rank, side, generator=generator, device=param.device) / math.sqrt(rank)
            cached = self._projections[param] = (key, matrix)
        return cached[1]

    def _init_apollo_state(self, param: torch.Tensor, rank: int, channels: int) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["exp_avg"] = torch.zeros(rank, channels, dtype=torch.float32, device=param.device)
            state["exp_avg_sq"] = torch.zeros(rank, channels, dtype=torch.float32, device=param.device)
            state["previous_norm"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["limited"] = torch.zeros((), dtype=torch.int64, device=param.device)
        return state

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        # torch casts loaded float state to the parameter's dtype; ours keeps its own
        # (float32 moments beside bf16 weights, int64 counters), so only move devices.
        return value if key == "step" else value.to(device=param.device)


# a block of gradient rows scaled at once on a CPU: 4 MiB of float32, held in the L3 cache
_CPU_BLOCK_ELEMENTS = 1 << 20


def _channel_sums(squares: torch.Tensor, channel_wise: bool) -> torch.Tensor:
    """Column sums of a matrix of squares (channel-wise), or its total as a 1-vector
    (tensor-wise, APOLLO-Mini)."""
    return squares.sum(0) if channel_wise else squares.sum().reshape(1)
