"""APOLLO: convergence against AdamW, state size to the byte, the limiter, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from behaviorc.train.apollo import APOLLO
from behaviorc.train.checkpoint import load_checkpoint, save_checkpoint


def _regression(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(512, 96, generator=g)
    target_weight = torch.randn(64, 96, generator=g) / math.sqrt(96)
    targets = inputs @ target_weight.T + 0.01 * torch.randn(512, 64, generator=g)
    start = torch.randn(64, 96, generator=g) * 0.01
    return inputs, targets, start


def _fit(make_optimizer, steps: int = 40) -> tuple[float, float]:
    inputs, targets, start = _regression()
    weight = torch.nn.Parameter(start.clone())
    bias = torch.nn.Parameter(torch.zeros(64))
    optimizer = make_optimizer([weight, bias])
    first = None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(inputs @ weight.T + bias, targets)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return first, float(torch.nn.functional.mse_loss(inputs @ weight.T + bias, targets))


def test_regression_apollo_final_loss_at_most_1_5x_adamw():
    """40 steps at lr 1e-2: AdamW ends below 1% of the start, APOLLO (rank 16) and
    APOLLO-Mini end at most 1.5x AdamW's loss (here both end lower). SGD at the same
    rate barely moves, so the adaptive scaling is what the test measures."""
    first, adamw = _fit(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0))
    _, apollo = _fit(lambda ps: APOLLO(ps, lr=1e-2, rank=16))
    _, mini = _fit(lambda ps: APOLLO.mini(ps, lr=1e-2))
    _, sgd = _fit(lambda ps: torch.optim.SGD(ps, lr=1e-2))
    assert adamw < 0.01 * first
    assert apollo <= 1.5 * adamw, (apollo, adamw)
    assert mini <= 1.5 * adamw, (mini, adamw)
    assert sgd > 0.5 * first


def test_tiny_gdn_apollo_loss_drop_at_least_0_7x_adamw(tiny_gdn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gdn)
    text = ["I will use the existing parser as asked.", "The tests should read the data now."]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    base = AutoModelForCausalLM.from_pretrained(tiny_gdn, dtype=torch.float32)

    def drop(make_optimizer, steps: int = 8) -> float:
        model = copy.deepcopy(base)
        optimizer = make_optimizer(model.parameters())
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(**batch, labels=labels).loss
            losses.append(float(loss.detach()))
            loss.backward()
            optimizer.step()
        return losses[0] - losses[-1]

    adamw = drop(lambda ps: torch.optim.AdamW(ps, lr=5e-3, weight_decay=0.0))
    apollo = drop(lambda ps: APOLLO(ps, lr=5e-3, rank=16))
    print(f"loss drop over 8 steps: AdamW {adamw:.3f}, APOLLO {apollo:.3f}")
    assert adamw > 0.5
    assert apollo >= 0.7 * adamw, (apollo, adamw)


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_state_of_projected_matrix_to_the_byte(shape):
    rank = 8
    weight = torch.nn.Parameter(torch.randn(*shape))
    optimizer = APOLLO([weight], rank=rank)
    weight.grad = torch.randn(*shape)
    optimizer.step()
    n = max(shape)
    # two float32 r x n moments + int64 step + float32 previous norm + int64 limiter count
    assert optimizer.state_bytes(weight) == 2 * rank * n * 4 + 8 + 4 + 8
    assert optimizer.state_bytes(weight) * 4 <= 2 * weight.numel() * 4  # <= 1/4 of AdamW's here


def test_small_and_non_matrix_parameters_take_adamw():
    conv = torch.nn.Parameter(torch.randn(8, 1, 4))  # a conv1d weight: 3-D
    small = torch.nn.Parameter(torch.randn(4, 100))  # smaller side not above the rank
    gate = torch.nn.Parameter(torch.randn(4))
    optimizer = APOLLO([conv, small, gate], rank=4, lr=1e-2)
    for p in (conv, small, gate):
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in (conv, small, gate)]
    optimizer.step()
    for p, b in zip((conv, small, gate), before):
        assert optimizer.state_bytes(p) == 2 * p.numel() * 4 + 8
        # AdamW's first step moves every element by lr against the gradient's sign
        torch.testing.assert_close(p.detach(), b - 1e-2, rtol=0, atol=1e-6)


def test_update_magnitude_matches_adamw_on_the_first_step():
    """alpha = sqrt(d/r) makes the first update's RMS about AdamW's (which is 1 * lr)."""
    weight = torch.nn.Parameter(torch.zeros(256, 512))
    optimizer = APOLLO([weight], lr=1.0, rank=32, limiter=None)
    weight.grad = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    rms = float(weight.detach().pow(2).mean().sqrt())
    assert 0.8 < rms < 1.25, rms


def _paper_step(weight: torch.Tensor, grad: torch.Tensor, projection: torch.Tensor, moments: dict,
                t: int, lr: float, weight_decay: float, channel_wise: bool) -> torch.Tensor:
    """One APOLLO step written plainly from the module docstring (the paper's Algorithm 1)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    tall = grad.shape[0] > grad.shape[1]
    g = grad.T if tall else grad
    r = projection @ g
    moments["m"] = beta1 * moments.get("m", torch.zeros_like(r)) + (1 - beta1) * r
    moments["v"] = beta2 * moments.get("v", torch.zeros_like(r)) + (1 - beta2) * r * r
    scaled = (moments["m"] / (1 - beta1 ** t)) / ((moments["v"] / (1 - beta2 ** t)).sqrt() + eps)
    if channel_wise:
        factors = scaled.norm(dim=0) / r.norm(dim=0)
    else:
        factors = scaled.norm() / r.norm()
    alpha = math.sqrt(g.shape[0] / projection.shape[0])
    update = alpha * g * factors
    return weight - lr * (update.T if tall else update) - lr * weight_decay * weight


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
@pytest.mark.parametrize("scaling", ["channel", "tensor"])
@pytest.mark.parametrize("grouped", [False, True])
def test_steps_follow_the_papers_formulas(shape, scaling, grouped):
    """The optimizer's in-place arithmetic (cache-blocked, or stacked) gives the plain formulas' weights."""
    rank = 8
    generator = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(*shape, generator=generator))
    optimizer = APOLLO([weight], lr=1e-2, rank=rank, refresh=2, weight_decay=0.1, limiter=None, scaling=scaling,
                       grouped=grouped)
    expected, moments = weight.detach().clone(), {}
    for t in range(1, 5):
        grad = torch.randn(*shape, generator=generator)
        weight.grad = grad.clone()
        optimizer.step()
        projection = optimizer._projection(weight, 0, t - 1, optimizer.param_groups[0], min(shape))
        expected = _paper_step(expected, grad, projection, moments, t, 1e-2, 0.1, scaling == "channel")
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_limiter_records_the_norm_of_the_update_it_applied(shape, scaling):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(*shape))
    optimizer = APOLLO([weight], lr=1e-3, rank=4, limiter=1.01, scaling=scaling)
    ratios = []
    for step in range(12):
        before = weight.detach().clone()
        weight.grad = torch.randn(*shape) * (2.0 ** step)
        optimizer.step()
        applied = float((weight.detach() - before).norm()) / 1e-3
        recorded = float(optimizer.state[weight]["previous_norm"])
        assert applied == pytest.approx(recorded, rel=1e-5)
        ratios.append(applied)
    growth = [b / a for a, b in zip(ratios, ratios[1:])]
    # a capped update is shrunk to exactly gamma times the previous one, not below it
    assert max(growth) == pytest.approx(1.01, rel=1e-5)


def test_limiter_keeps_update_norm_growth_at_most_1_01_per_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(32, 48))
    optimizer = APOLLO([weight], lr=1e-3, rank=4, limiter=1.01)
    norms = []
    for step in range(30):
        before = weight.detach().clone()
        # gradients that grow fast and change direction: the raw update would jump
        weight.grad = torch.randn(32, 48) * (1.5 ** step)
        optimizer.step()
        norms.append(float((weight.detach() - before).norm()) / 1e-3)
    ratios = [b / a for a, b in zip(norms, norms[1:])]
    assert max(ratios) <= 1.01 + 1e-5, max(ratios)
    assert optimizer.limiter_activations > 0


def _train(model: torch.nn.Module, optimizer: APOLLO, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        inputs = torch.randn(16, 40, generator=g)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def _model_and_optimizer() -> tuple[torch.nn.Module, APOLLO]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 24))
    return model, APOLLO(model.parameters(), lr=1e-2, rank=8, refresh=3, weight_decay=0.01)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, range(0, 10))
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, range(0, 4))  # the resume lands mid refresh-period (refresh 3)
    save_checkpoint(tmp_path / "ckpt", dict(model.named_parameters()), optimizer, {"step": 4})

    model, optimizer = _model_and_optimizer()  # fresh objects: nothing carried in memory
    scalars = load_checkpoint(tmp_path / "ckpt", dict(model.named_parameters()), optimizer)
    _train(model, optimizer, range(scalars["step"], 10))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), uninterrupted[name], rtol=0, atol=0)


# -- the grouped path (GPU shape: one kernel per op per shape, not per matrix) -----------

def _blocks(count: int, hidden: int = 48, ffn: int = 80, seed: int = 0) -> list[torch.nn.Parameter]:
    """The matrices of `count` transformer blocks (q, k, v, o; gate, up tall; down wide)
    and a norm vector each, at sizes a test can step on one CPU core."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,)]
    return [torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02) for _ in range(count) for shape in shapes]


def _set_gradients(params: list[torch.nn.Parameter], step: int, growth: float = 1.0) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * growth ** step


def _profiled_step(optimizer: APOLLO, params: list[torch.nn.Parameter]):
    from torch.profiler import ProfilerActivity, profile

    _set_gradients(params, 0)
    optimizer.step()  # state made, projections drawn: what follows is a steady step
    _set_gradients(params, 1)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        optimizer.step()
    return trace.events()


def _top_level_aten_ops(events) -> int:
    """Aten ops called from Python (not from inside another aten op): on a GPU each is a
    launch or a multi-tensor launch; the foreach ops' per-tensor loops on a CPU are their
    children and stay out of the count."""
    return sum(1 for e in events if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_grouped_step_ops_do_not_grow_with_the_number_of_matrices(scaling):
    counts = {}
    for blocks in (4, 16):
        params = _blocks(blocks)
        rank = 8 if scaling == "channel" else 1
        optimizer = APOLLO(params, rank=rank, scaling=scaling, grouped=True, weight_decay=0.01)
        counts[blocks] = _top_level_aten_ops(_profiled_step(optimizer, params))
    assert counts[16] <= 1.1 * counts[4], counts
    # the per-matrix path does grow, so the count can tell
    per_matrix = {}
    for blocks in (4, 16):
        params = _blocks(blocks)
        per_matrix[blocks] = _top_level_aten_ops(_profiled_step(APOLLO(params, rank=8, grouped=False), params))
    assert per_matrix[16] > 2 * per_matrix[4], per_matrix


def test_grouped_step_reads_nothing_back_to_the_host():
    params = _blocks(2)
    optimizer = APOLLO(params, rank=8, grouped=True, limiter=1.01, weight_decay=0.01)
    names = {e.name for e in _profiled_step(optimizer, params)}
    assert "aten::mm" not in names and "aten::bmm" in names  # the grouped path ran
    assert "aten::_local_scalar_dense" not in names


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_grouped_updates_equal_the_per_matrix_path_over_20_steps(scaling):
    """Same weights, same gradients (growing, so the limiter acts), refresh every 7 steps:
    the grouped and per-matrix paths end with the same weights and states to fp32
    rounding, step after step."""
    weights = {}
    optimizers = {}
    for grouped in (False, True):
        params = _blocks(3, seed=5)
        optimizers[grouped] = APOLLO(params, lr=1e-2, rank=8 if scaling == "channel" else 1,
                                     scaling=scaling, refresh=7, weight_decay=0.1, grouped=grouped)
        weights[grouped] = params
    for step in range(20):
        for grouped, params in weights.items():
            _set_gradients(params, step, growth=1.3)
            optimizers[grouped].step()
        for per_matrix, grouped in zip(weights[False], weights[True]):
            torch.testing.assert_close(grouped.detach(), per_matrix.detach(), rtol=1e-5, atol=1e-6)
    assert optimizers[True].limiter_activations == optimizers[False].limiter_activations > 0
    assert int(optimizers[True].limiter_activations_since_start()) == optimizers[True].limiter_activations
    for per_matrix, grouped in zip(weights[False], weights[True]):
        a, b = optimizers[False].state[per_matrix], optimizers[True].state[grouped]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_grouped_state_resumes_from_a_checkpoint(tmp_path):
    """The per-matrix states are views into the stacks: a checkpoint saves them one by
    one and a fresh optimizer loaded from it goes on exactly as the uninterrupted one."""
    def run(steps, optimizer, params):
        for step in steps:
            _set_gradients(params, step)
            optimizer.step()

    params = _blocks(2)
    optimizer = APOLLO(params, lr=1e-2, rank=8, refresh=3, grouped=True)
    run(range(6), optimizer, params)
    uninterrupted = [p.detach().clone() for p in params]

    params = _blocks(2)
    optimizer = APOLLO(params, lr=1e-2, rank=8, refresh=3, grouped=True)
    run(range(4), optimizer, params)
    named = {str(i): p for i, p in enumerate(params)}
    save_checkpoint(tmp_path / "ckpt", named, optimizer, {"step": 4})
    params = _blocks(2)
    named = {str(i): p for i, p in enumerate(params)}
    optimizer = APOLLO(params, lr=1e-2, rank=8, refresh=3, grouped=True)
    load_checkpoint(tmp_path / "ckpt", named, optimizer)
    run(range(4, 6), optimizer, params)
    for param, expected in zip(params, uninterrupted):
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_bench_refuses_to_run_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
