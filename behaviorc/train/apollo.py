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
update's RMS is AdamW's). In the paper's `alpha = sqrt(n/r)`, n is this d: the side the
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

On a GPU that arrangement is the wrong shape: a step of one kernel per op per matrix is
bound by launches, not bytes (an H200 profile: 1,044 launches for 28 matrices, 22 ms of
CPU for 6 ms of GPU work). The grouped path (the default on CUDA, `grouped=True` forces
it elsewhere) steps the matrices of one shape together: their gradients copied into one
stack, the projections as one batched product (TF32 with fp32 accumulation on CUDA), the
moments, factors and limiter on k x r x n stacks, and the weights updated with
`torch._foreach_*` ops, so the kernels per step grow with the number of shapes, not of
matrices, and no value comes back to the host. The per-matrix states are views into
those stacks (a state dict still holds one entry per matrix). Its extra scratch is the
gradient stack of the largest shape group. The update's norm comes from the factors and
the gradient's column norms (||G diag(s)||^2 = sum_j s_j^2 ||G[:, j]||^2), so the limiter
is folded into the factors before the one pass that applies the update.

Step counts are mirrored on the host, so bias corrections never read a tensor back.

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

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import torch

from behaviorc.train.distributed import local_shard

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
        grouped: bool | None = None,
    ):
        """`grouped`: step the matrices of one shape together (see the module docstring);
        None takes it on CUDA and the per-matrix path elsewhere."""
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
        # not a hyperparameter: how the step is computed, not what it computes, so it stays
        # out of the param groups (and of checkpoints)
        self.grouped = grouped
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._projections: dict[torch.Tensor, tuple[tuple[int, ...], torch.Tensor]] = {}
        self._step_counts: dict[torch.Tensor, int] = {}
        self._stacks: dict[tuple[int, ...], _Stack] = {}
        self._activations: torch.Tensor | None = None

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

    def limiter_activations_since_start(self) -> torch.Tensor:
        """Limiter activations since this optimizer was made, as a tensor on the device
        of the matrices: a training loop reads it when it logs, with its other figures,
        instead of syncing on every matrix's count."""
        if self._activations is None:
            return torch.zeros((), dtype=torch.int64)
        return self._activations

    def state_bytes(self, param: torch.Tensor | None = None) -> int:
        """Bytes of optimizer state held for one parameter, or for all of them."""
        states = [self.state[param]] if param is not None else list(self.state.values())
        return sum(v.numel() * v.element_size() for s in states for v in s.values()
                   if isinstance(v, torch.Tensor))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # the loaded tensors replace those the host-side counts and the stacks stand for
        self._step_counts.clear()
        self._stacks.clear()

    def _use_grouped(self, param: torch.Tensor) -> bool:
        return self.grouped if self.grouped is not None else param.device.type == "cuda"

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
                singles = [(n, p) for n, p in projected if not self._use_grouped(p)]
                for n, p in singles:
                    self._apollo_step(n, p, group)
                if len(singles) < len(projected):
                    self._apollo_grouped([(n, p) for n, p in projected if self._use_grouped(p)], group)
        return loss

    def _advance(self, params: list[torch.Tensor]) -> list[int]:
        """Count one more step for each parameter (initialised state): in its `step`
        tensor, which checkpoints save, and in a host-side mirror that the bias
        corrections read, so no step reads a tensor back (only the first after a load)."""
        counts = []
        for param in params:
            count = self._step_counts.get(param)
            if count is None:
                count = int(self.state[param]["step"])
            self._step_counts[param] = count + 1
            counts.append(count + 1)
        torch._foreach_add_([self.state[p]["step"] for p in params], 1)
        return counts

    def _adamw(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        grads = [p.grad for p in params]
        states = [self._init_adamw_state(p) for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = self._advance(params)

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
            self._step_counts[param] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _project(self, projection: torch.Tensor, oriented: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """R = P G, the projected gradient: r x d by d x n for one matrix, or [k, r, d] by
        [k, d, n] for a stack of k matrices of one shape. Every projected gradient of
        both paths is formed here, so what must happen to it before the moments see it
        (a sharded parameter's partial products summed over its shards) has one place."""
        if projection.ndim == 2:
            return torch.mm(projection, oriented, out=out)
        return torch.bmm(projection, oriented, out=out)

    def _count_activations(self, capped: torch.Tensor) -> None:
        total = capped.sum() if capped.ndim else capped
        if self._activations is None:
            self._activations = torch.zeros((), dtype=torch.int64, device=capped.device)
        self._activations += total.to(self._activations.device, non_blocking=True)

    # -- the per-matrix path (CPU) ---------------------------------------------------------

    def _apollo_step(self, number: int, param: torch.Tensor, group: dict[str, Any]) -> None:
        # One matrix at a time: its projected gradient, moments and scaled moments (r x n
        # each) then stay in cache from one pass to the next, and one r x n workspace
        # serves every matrix.
        beta1, beta2 = group["betas"]
        lr, rank = group["lr"], group["rank"]
        # A sharded parameter (FSDP2) is updated in this rank's rows; `shard.sum` adds
        # over the ranks what spans rows (behaviorc.train.distributed).
        shard = local_shard(param)
        tall = param.shape[0] > param.shape[1]
        grad = shard.grad.float()
        oriented = grad.T if tall else grad  # d x n, d <= n (this rank's rows of it)
        side, channels = min(param.shape), oriented.shape[1]
        state = self._init_apollo_state(param, rank, channels)
        [t] = self._advance([param])

        projected = self._scratch("projected", rank * channels, param.device).view(rank, channels)
        projection = self._projection(param, number, t - 1, group, side)
        if not tall:  # the rows are the projected side: each rank projects its own
            projection = projection[:, shard.rows]
        self._project(projection, oriented, projected)
        if not tall:
            shard.sum(projected)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(projected, 1 - beta1)
        projected_squares = projected.square_()  # R itself is no longer needed
        exp_avg_sq.lerp_(projected_squares, 1 - beta2)

        # s_j = ||R~[:, j]|| / ||R[:, j]|| with R~ = (M / bc1) / (sqrt(V / bc2) + eps)
        #                                        = (sqrt(bc2) / bc1) * M / (sqrt(V) + eps sqrt(bc2)):
        # the scalar goes onto the factors, and R~ / scalar is built in the workspace.
        # Column sums of squares, not column norms: summing over the rows of a row-major
        # matrix is vectorised, a norm over them is not (20x slower on this CPU).
        channel_wise = group["scaling"] == "channel"
        # a tall matrix's channels are its rows: the tensor-wise sums span the ranks
        whole_sum = shard.sum if tall and not channel_wise else (lambda sums: sums)
        projected_sums = whole_sum(_channel_sums(projected_squares, channel_wise))
        factors = _scaling_factors(exp_avg, exp_avg_sq, projected_sums, projected, t, group,
                                   whole_sum)

        # the factors index the channels of the oriented gradient: broadcast them onto G
        factors = factors.unsqueeze(1) if tall and channel_wise else factors.unsqueeze(0)

        # W <- W (1 - lr wd) - lr U: the update goes in at full size first, and its norm
        # comes out of the same pass over G; the limiter then takes back what exceeds
        # gamma times the previous norm. W - lr U + lr (1 - limit) U is W - lr limit U up
        # to rounding, and the limiter seldom acts in training (on gradient spikes; not
        # once in 30 steps on tiny-gdn at lr 1e-4), so most steps read G once here, not twice.
        alpha = _alpha(group, side)
        decay = 1 - lr * group["weight_decay"]
        update_norm = alpha * shard.sum(
            self._apply_update(shard.weights, grad, factors, decay, -lr * alpha)).sqrt()
        if group["limiter"] is not None:
            limit = self._limit(update_norm, state["previous_norm"], state["limited"], group["limiter"])
            update_norm = update_norm * limit
            # a CPU skips the correction when nothing was capped; an accelerator would
            # need a host sync to know, so it always takes it (a zero correction)
            if param.device.type != "cpu" or bool(limit != 1):
                shard.weights.addcmul_(grad, factors * (1 - limit), value=lr * alpha)
        state["previous_norm"].copy_(update_norm)

    def _limit(self, update_norm: torch.Tensor, previous: torch.Tensor, limited: torch.Tensor,
               gamma: float) -> torch.Tensor:
        """The norm-growth limiter, on the device (elementwise over a stack of matrices):
        the factor that brings each update's norm down to gamma times the previous one
        where it grew more, else 1; counts the activations into `limited`."""
        capped = (previous > 0) & (update_norm > gamma * previous)
        limited += capped
        self._count_activations(capped)
        return torch.where(capped, gamma * previous / update_norm, 1.0)

    def _apply_update(self, param: torch.Tensor, grad: torch.Tensor, factors: torch.Tensor,
                      decay: float, step_size: float) -> torch.Tensor:
        """param <- decay * param + step_size * grad * factors (factors broadcast along
        rows or columns); returns ||grad * factors||^2. The product goes through a
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
        return torch.stack(squares).sum() if squares else grad.new_zeros(())

    # -- the grouped path (CUDA) -----------------------------------------------------------

    def _apollo_grouped(self, numbered: list[tuple[int, torch.Tensor]], group: dict[str, Any]) -> None:
        """Step the matrices of each shape (and step count, so the bias corrections are
        one number) together; see the module docstring."""
        by_shape: dict[tuple[Any, ...], list[tuple[int, torch.Tensor]]] = {}
        for number, param in numbered:
            key = (param.device, param.dtype, tuple(param.shape), self._steps_done(param))
            by_shape.setdefault(key, []).append((number, param))
        largest = max(len(members) * members[0][1].numel() for members in by_shape.values())
        with _tf32_products(numbered[0][1].device):
            for members in by_shape.values():
                gradients = self._scratch("gradients", largest, members[0][1].device)
                self._stack_step(members, group, gradients)

    def _steps_done(self, param: torch.Tensor) -> int:
        count = self._step_counts.get(param)
        if count is None:
            state = self.state[param]
            count = int(state["step"]) if "step" in state else 0
        return count

    def _stack_step(self, members: list[tuple[int, torch.Tensor]], group: dict[str, Any],
                    gradients: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        lr, rank = group["lr"], group["rank"]
        params = [param for _, param in members]
        rows, columns = params[0].shape
        tall = rows > columns
        side, channels = min(rows, columns), max(rows, columns)
        stack = self._stack(members, rank, channels)
        [t] = set(self._advance(params))

        # G: the gradients in the weights' own layout (so that its slices and the weights
        # have the same strides, which the foreach kernels need); the oriented d x n view
        # of a tall one is its transpose, which the batched product reads as it is.
        stacked = gradients[:len(params) * rows * columns].view(len(params), rows, columns)
        views = stack.gradient_views(stacked)
        torch._foreach_copy_(views, [p.grad for p in params])
        oriented = stacked.transpose(1, 2) if tall else stacked
        projected = self._scratch("projected", len(params) * rank * channels, params[0].device)
        projected = self._project(self._stacked_projection(stack, members, t - 1, group, side),
                                  oriented, projected.view(len(params), rank, channels))
        stack.exp_avg.lerp_(projected, 1 - beta1)
        projected_squares = projected.square_()
        stack.exp_avg_sq.lerp_(projected_squares, 1 - beta2)
        channel_wise = group["scaling"] == "channel"
        sum_over = (1,) if channel_wise else (1, 2)
        projected_sums = projected_squares.sum(sum_over)  # [k, n] or [k]
        factors = _scaling_factors(stack.exp_avg, stack.exp_avg_sq, projected_sums, projected, t, group)

        # ||G diag(s)||^2 = sum_j s_j^2 ||G[:, j]||^2 (oriented): the update's norm before
        # the update exists, so the limiter goes into the factors and the update is
        # applied in one pass
        if channel_wise:
            column_norms = torch.linalg.vector_norm(stacked, dim=2 if tall else 1)
            update_norm = torch.linalg.vector_norm(factors * column_norms, dim=1)
        else:
            update_norm = factors * torch.linalg.vector_norm(stacked, dim=(1, 2))
        alpha = _alpha(group, side)
        update_norm.mul_(alpha)
        step_sizes = torch.full_like(update_norm, -lr * alpha)
        if group["limiter"] is not None:
            limit = self._limit(update_norm, stack.previous_norm, stack.limited, group["limiter"])
            update_norm.mul_(limit)
            step_sizes.mul_(limit)
        stack.previous_norm.copy_(update_norm)
        coefficients = factors.mul_(step_sizes.unsqueeze(1)) if channel_wise else factors.mul_(step_sizes)
        # channels of a tall matrix are its rows, of a wide one its columns
        stacked.mul_(coefficients.view(len(params), -1, 1) if tall or not channel_wise
                     else coefficients.view(len(params), 1, -1))
        decay = 1 - lr * group["weight_decay"]
        if decay != 1:
            torch._foreach_mul_(params, decay)
        # foreach kernels want one dtype: low-precision weights take the update cast in one
        # batched op (rounded twice, the update then the sum, where the per-matrix path
        # rounds once: a bf16 rounding of an update far below the weight's own)
        updates = views if params[0].dtype == torch.float32 else list(stacked.to(params[0].dtype).unbind(0))
        torch._foreach_add_(params, updates)

    def _stack(self, members: list[tuple[int, torch.Tensor]], rank: int, channels: int) -> "_Stack":
        """The stacked state of these matrices, made (from their own states where they
        have them: a loaded checkpoint, or a change of group) when their states are not
        the stack's views any more."""
        key = tuple(number for number, _ in members)
        stack = self._stacks.get(key)
        params = [param for _, param in members]
        if stack is not None and stack.binds([self.state[p] for p in params]):
            return stack
        for other in [k for k, s in self._stacks.items() if set(k) & set(key)]:
            del self._stacks[other]
        states = [self._init_apollo_state(p, rank, channels) for p in params]
        stack = _Stack(*(torch.stack([s[name] for s in states]) for name in _Stack.STACKED))
        stack.bind(states)
        self._stacks[key] = stack
        return stack

    def _stacked_projection(self, stack: "_Stack", members: list[tuple[int, torch.Tensor]], step: int,
                            group: dict[str, Any], side: int) -> torch.Tensor:
        """The [k, r, d] stack of the matrices' projections: each the same draw as the
        per-matrix path's, held by the stack instead of per matrix."""
        key = (group["seed"], step // group["refresh"], group["rank"], side)
        if stack.projection is None or stack.projection_key != key:
            stack.projection = torch.stack([
                _draw_projection(group["seed"], number, key[1], group["rank"], side, param.device)
                for number, param in members])
            stack.projection_key = key
        return stack.projection

    # -- shared ----------------------------------------------------------------------------

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
            matrix = _draw_projection(group["seed"], number, period, rank, side, param.device)
            cached = self._projections[param] = (key, matrix)
        return cached[1]

    def _init_apollo_state(self, param: torch.Tensor, rank: int, channels: int) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            self._step_counts[param] = 0
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


@dataclass
class _Stack:
    """The state of k matrices of one shape as stacks; each matrix's state entries are
    views into them. Also the k x r x d stack of their projections (scratch)."""

    STACKED = ("exp_avg", "exp_avg_sq", "previous_norm", "limited")

    exp_avg: torch.Tensor  # [k, r, n]
    exp_avg_sq: torch.Tensor  # [k, r, n]
    previous_norm: torch.Tensor  # [k]
    limited: torch.Tensor  # [k], int64
    projection: torch.Tensor | None = None
    projection_key: tuple[int, ...] | None = None
    _bound: list[tuple[torch.Tensor, ...]] | None = None
    _gradient_views: list[torch.Tensor] | None = None

    def bind(self, states: list[dict[str, torch.Tensor]]) -> None:
        self._bound = []
        for index, state in enumerate(states):
            for name in self.STACKED:
                state[name] = getattr(self, name)[index]
            self._bound.append(tuple(state[name] for name in self.STACKED))

    def binds(self, states: list[dict[str, torch.Tensor]]) -> bool:
        """Whether these states still hold this stack's views (a load replaces them)."""
        return self._bound is not None and len(states) == len(self._bound) and all(
            state.get(name) is view for state, views in zip(states, self._bound)
            for name, view in zip(self.STACKED, views))

    def gradient_views(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """The k slices of the gradient stack, made once per buffer (unbinding is an op
        per matrix)."""
        views = self._gradient_views
        if views is None or views[0].data_ptr() != stacked.data_ptr() or len(views) != stacked.shape[0]:
            views = self._gradient_views = list(stacked.unbind(0))
        return views


# a block of gradient rows scaled at once on a CPU: 4 MiB of float32, held in the L3 cache
_CPU_BLOCK_ELEMENTS = 1 << 20


def _alpha(group: dict[str, Any], side: int) -> float:
    return group["scale"] if group["scale"] is not None else math.sqrt(side / group["rank"])


def _scaling_factors(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, projected_sums: torch.Tensor,
                     workspace: torch.Tensor, step: int, group: dict[str, Any],
                     whole_sum: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> torch.Tensor:
    """s = ||R~|| / ||R|| per channel (or per tensor) from the moments and the sums of
    squares of R, with R~ / (sqrt(bc2) / bc1) built in `workspace` (R's, no longer needed);
    for one matrix ([r, n] -> [n] or [1]) or a stack ([k, r, n] -> [k, n] or [k]).
    `whole_sum` adds R~'s sums over the ranks where a sharded matrix's channels span them."""
    beta1, beta2 = group["betas"]
    bias2 = math.sqrt(1 - beta2 ** step)
    channel_wise = group["scaling"] == "channel"
    scaled = torch.sqrt(exp_avg_sq, out=workspace).add_(group["eps"] * bias2)
    scaled_squares = torch.div(exp_avg, scaled, out=scaled).square_()
    if exp_avg.ndim == 2:
        scaled_sums = whole_sum(_channel_sums(scaled_squares, channel_wise))
    else:
        scaled_sums = scaled_squares.sum((1,) if channel_wise else (1, 2))
    tiny = torch.finfo(torch.float32).tiny
    factors = scaled_sums.div_(projected_sums.clamp_min_(tiny)).sqrt_()
    return factors.mul_(bias2 / (1 - beta1 ** step))


def _draw_projection(seed: int, number: int, period: int, rank: int, side: int,
                     device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + number) * 1_000_033 + period)
    return torch.randn(rank, side, generator=generator, device=device) / math.sqrt(rank)


@contextlib.contextmanager
def _tf32_products(device: torch.device) -> Iterator[None]:
    """Float32 products on CUDA in TF32 (fp32 accumulation) for the duration: the
    projection is a sketch, its inputs' 10-bit mantissas are plenty, and fp32 SIMT
    GEMMs were the largest part of a step on an H200."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    setting = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"  # torch < 2.9
    before = getattr(matmul, setting)
    setattr(matmul, setting, "tf32" if setting == "fp32_precision" else True)
    try:
        yield
    finally:
        setattr(matmul, setting, before)


def _channel_sums(squares: torch.Tensor, channel_wise: bool) -> torch.Tensor:
    """Column sums of a matrix of squares (channel-wise), or its total as a 1-vector
    (tensor-wise, APOLLO-Mini)."""
    return squares.sum(0) if channel_wise else squares.sum().reshape(1)
