"""Composition speed, memory and agreement: behaviorc's streaming merge beside mergekit.

The bench writes a random Qwen3 base model and K fine-tuned variants of it (the base plus
random perturbations of every parameter) into a temporary folder, once in bfloat16 and
once in float32, then merges them by every method (task arithmetic, TIES, DARE linear and
TIES, DELLA and DELLA linear, Model Breadcrumbs and its TIES variant, Model Stock, linear,
SLERP (t 0.3) and NuSLERP between the first two, Multi-SLERP, Karcher) and a few settings
(rescale on ties and breadcrumbs, the first term's own density 0.5 or 0, Model Stock
filter-wise, NuSLERP per row) with weights (1.0, 0.5, -0.8, ...) (Model Stock, Karcher
and SLERP: 1 each), density 0.2 (0.4 for DELLA, 0.5 for breadcrumbs): once with
`behaviorc merge` and once with mergekit 0.1.5's `mergekit-yaml`,
each as the command a user runs, in its own process, start-up included (mergekit in a
virtual environment the bench creates beside this machine's torch). mergekit reads the
YAML behaviorc exports for the same composition, so the export is exercised too. Both
compute in float32 and write the inputs' dtype. behaviorc hashes its inputs for
provenance and remembers the hashes by file state: the bench hashes them once before
timing, as any first merge of new models does, and reports that time apart. The two
tools run alternately, method by
method and dtype by dtype, so a shared machine's load falls on both alike.

Reported per method and dtype: wall seconds and peak RSS of each process, and agreement.
Methods without randomness must agree to a unit in the last place of the output dtype
(of the largest of the results and the input weights; Model Stock and linear, whose
formulas round differently in mergekit, to 16 in float32), except at entries whose magnitude ties with a trim threshold (ties and breadcrumbs keep
exactly k entries; behaviorc keeps the earliest tied ones, mergekit an arbitrary few):
those differences are counted apart. The random drops (dare, della) are compared by
their statistics over the whole model: the share of entries the merge changes, the norm
of the merged delta relative to task arithmetic's and its cosine with task arithmetic's
delta, each within 1% of mergekit's. The spherical methods (slerp, nuslerp, multislerp,
karcher), which normalize whole float32 tensors, are compared with their float64 result:
behaviorc must be within 2^-22 of each tensor's largest entry (bfloat16 outputs: 2^-8,
their own rounding), or no further than mergekit. The headline is the slowest method's speed-up.

Sizes (parameters): tiny ~6M, small ~34M (hidden 384, 6 layers, vocab 32000; the
default: mergekit takes about a minute a method on it), 125m ~125M (hidden 768, 12
layers, vocab 32000; the size of SmolLM2-135M). If mergekit cannot be installed the
baseline is an in-memory torch merge (`--baseline torch`, ties and task arithmetic only),
said so in the output.

  python bench/compose.py                                 # every method, bf16 and fp32
  python bench/compose.py --methods ties,dare_ties --dtypes bf16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from behaviorc.core.merge_methods import METHODS as METHODS_TRAITS
from behaviorc.formats.safetensors_io import (
    PlannedTensor, StreamWriter, WeightFolder, content_sha256, to_float32)

SIZES = {
    "tiny": dict(hidden=256, layers=2, intermediate=768, vocab=8000, heads=4, kv_heads=2),
    "small": dict(hidden=384, layers=6, intermediate=1024, vocab=32000, heads=6, kv_heads=2),
    "125m": dict(hidden=768, layers=12, intermediate=2048, vocab=32000, heads=12, kv_heads=4),
}
HEAD_DIM = 64
WEIGHTS = (1.0, 0.5, -0.8, 0.7, -0.3, 0.9)
MERGEKIT_VERSION = "0.1.5"
METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
           "breadcrumbs", "breadcrumbs_ties", "model_stock", "linear", "slerp", "nuslerp",
           "multislerp", "karcher", "ties_rescale", "breadcrumbs_rescale", "ties_density_zero",
           "model_stock_filter_wise", "nuslerp_rows")
# Cases beyond a method's defaults: (method, options, the first term's own settings).
CASES = {"ties_rescale": ("ties", ["--rescale"], ",density=0.5"),
         "breadcrumbs_rescale": ("breadcrumbs", ["--rescale"], ""),
         "ties_density_zero": ("ties", [], ",density=0"),
         "model_stock_filter_wise": ("model_stock", ["--filter-wise"], ""),
         "nuslerp_rows": ("nuslerp", ["--no-flatten"], ""),
         "slerp": ("slerp", ["--t", "0.3"], "")}
TWO_TERMS = ("slerp", "nuslerp")  # methods that take two models
UNWEIGHTED = ("model_stock", "karcher", "slerp")  # each model counts once
DENSITIES = {"della": 0.4, "della_linear": 0.4, "breadcrumbs": 0.5, "breadcrumbs_ties": 0.5}
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")
STORED = {"bf16": "BF16", "fp32": "F32"}
# mergekit's Model Stock computes (1 - t) base + t mean(finetuned), behaviorc base + t
# mean(tau): equal but for float32 rounding, a few units in the last place in float32.
# The spherical methods find their factors in float64 from summed inner products, where
# mergekit rounds whole normalized float32 tensors: a few more.
ULP_TOLERANCE = {"model_stock": 16, "linear": 16}
# mergekit's spherical methods normalize whole float32 tensors: each tool is compared with
# the float64 result instead (compare_reference).
TENSOR_ROUNDED = ("slerp", "nuslerp", "multislerp", "karcher")


def qwen3_config(size: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": size["hidden"], "num_hidden_layers": size["layers"],
        "intermediate_size": size["intermediate"], "vocab_size": size["vocab"],
        "num_attention_heads": size["heads"], "num_key_value_heads": size["kv_heads"],
        "head_dim": HEAD_DIM, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 0, "rope_theta": 1000000.0,
    }


def parameter_shapes(size: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3ForCausalLM checkpoint names and shapes."""
    hidden, inner, vocab = size["hidden"], size["intermediate"], size["vocab"]
    q_width, kv_width = size["heads"] * HEAD_DIM, size["kv_heads"] * HEAD_DIM
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(size["layers"]):
        prefix = f"model.layers.{layer}."
        shapes += [
            (prefix + "input_layernorm.weight", (hidden,)),
            (prefix + "post_attention_layernorm.weight", (hidden,)),
            (prefix + "self_attn.q_proj.weight", (q_width, hidden)),
            (prefix + "self_attn.k_proj.weight", (kv_width, hidden)),
            (prefix + "self_attn.v_proj.weight", (kv_width, hidden)),
            (prefix + "self_attn.o_proj.weight", (hidden, q_width)),
            (prefix + "self_attn.q_norm.weight", (HEAD_DIM,)),
            (prefix + "self_attn.k_norm.weight", (HEAD_DIM,)),
            (prefix + "mlp.gate_proj.weight", (inner, hidden)),
            (prefix + "mlp.up_proj.weight", (inner, hidden)),
            (prefix + "mlp.down_proj.weight", (hidden, inner)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def generate_models(root: Path, size: dict[str, int], count: int, dtype: str
                    ) -> tuple[Path, list[Path]]:
    """A random base and `count` perturbed copies in `dtype` (bf16 or fp32), streamed
    tensor by tensor to disk."""
    shapes = parameter_shapes(size)
    plan = [PlannedTensor(name, STORED[dtype], shape) for name, shape in shapes]
    folders = [root / "base"] + [root / f"finetuned_{i}" for i in range(count)]
    writers = []
    for folder in folders:
        folder.mkdir(parents=True)
        config = {**qwen3_config(size), "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        writers.append(StreamWriter(folder, [("model.safetensors", plan)], {}))
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes:
        is_norm = len(shape) == 1
        base = (torch.ones(shape) if is_norm else torch.randn(shape, generator=generator) * 0.02)
        stored = bfloat16_bits if dtype == "bf16" else (lambda values: values.numpy())
        writers[0].write(name, stored(base))
        for writer in writers[1:]:
            noise = torch.randn(shape, generator=generator) * (0.01 if is_norm else 0.002)
            writer.write(name, stored(base + noise))
    for writer in writers:
        writer.finish()
    return folders[0], folders[1:]


def bfloat16_bits(values: torch.Tensor) -> np.ndarray:
    """A tensor rounded to bfloat16, as the bits StreamWriter stores."""
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


# Runs a command as its own child and reports that child's peak RSS. Measuring the
# command as a direct child of this process would not do: Linux carries a process's
# peak RSS across exec, and a child started with vfork (as subprocess does) inherits
# the peak of the parent whose memory it shared, here the bench with its comparisons.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"@@peak_rss_kb {usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run a command to completion; its wall seconds and peak RSS in MB."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")
    peak_kb = int(output.rsplit("@@peak_rss_kb ", 1)[1].split()[0])
    return seconds, peak_kb / 1024


def ensure_mergekit(venv: Path) -> Path | None:
    """mergekit-yaml in a virtual environment that shares this machine's torch."""
    script = venv / "bin" / "mergekit-yaml"
    if script.is_file():
        return script
    print(f"installing mergekit {MERGEKIT_VERSION} into {venv} ...", flush=True)
    created = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    if created.returncode == 0:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        f"mergekit=={MERGEKIT_VERSION}"])
    return script if script.is_file() else None


def in_memory_merge(args: argparse.Namespace) -> None:
    """The fallback baseline: every model loaded whole, TIES with a full sort."""
    from safetensors.torch import load_file, save_file

    base = load_file(Path(args.base) / "model.safetensors")
    tuned = [load_file(Path(p) / "model.safetensors") for p in args.models]
    weights = torch.tensor(args.weights)
    merged = {}
    for name, original in base.items():
        b = original.float()
        deltas = torch.stack([t[name].float() - b for t in tuned])
        if args.method == "ties":
            for delta in deltas:
                keep = max(1, int(args.density * delta.numel()))
                order = torch.argsort(delta.abs().view(-1), descending=True)
                mask = torch.zeros(delta.numel())
                mask[order[:keep]] = 1
                delta.mul_(mask.view_as(delta))
        weighted = deltas * weights.view(-1, *[1] * b.dim())
        if args.method == "ties":
            agree = weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
            mixed = (weighted * agree).sum(0)
            divisor = (weights.view(-1, *[1] * b.dim()) * agree).sum(0)
            mixed /= torch.where(divisor == 0, 1.0, divisor)
        else:
            mixed = weighted.sum(0)
        merged[name] = (b + mixed).to(original.dtype)
    Path(args.out).mkdir(parents=True)
    save_file(merged, Path(args.out) / "model.safetensors", metadata={"format": "pt"})


def float32_of(folder: WeightFolder, name: str) -> torch.Tensor:
    return torch.from_numpy(to_float32(folder.read(name), folder.tensors[name].dtype))


def trim_ranks(method: str, density: float, count: int) -> list[int]:
    """The ranks (from the largest magnitude) where a method cuts each vector: entries
    tied with the magnitude at such a rank are kept or dropped arbitrarily by mergekit."""
    if density >= 1:
        return []
    if method == "ties":
        return [max(1, int(density * count))]
    if method.startswith("breadcrumbs"):
        kept = int(density * count)
        dropped = min(int(0.01 * count), count - kept)  # gamma 0.01, mergekit's default
        return [rank for rank in (dropped, dropped + kept) if 0 < rank <= count]
    return []


def compare_exact(ours: Path, theirs: Path, base_dir: Path, tuned: list[Path], method: str,
                  densities: list[float]) -> dict[str, float]:
    """Largest differences between two merged models, in units in the last place of
    the output; differences at entries tied at a trim threshold are counted apart."""
    worst_all = worst_ulps_elsewhere = 0.0
    tied_entries = 0
    with WeightFolder(ours) as a, WeightFolder(theirs) as b, WeightFolder(base_dir) as base:
        if set(a.tensors) != set(b.tensors):
            raise SystemExit(f"outputs hold different tensors: {set(a.tensors) ^ set(b.tensors)}")
        tuned_folders = [WeightFolder(p) for p in tuned]
        for name in a.tensors:
            mantissa_bits = 7 if a.tensors[name].dtype == "BF16" else 23
            x, y = float32_of(a, name), float32_of(b, name)
            diff = (x - y).abs()
            worst_all = max(worst_all, float(diff.max()))
            # A unit in the last place of the largest of the outputs and the input weights:
            # formulas that round differently (Model Stock's mix of base and average)
            # differ by that much where the result nearly cancels.
            scale = torch.stack([x.abs(), y.abs(), *(float32_of(f, name).abs()
                                                     for f in (base, *tuned_folders))]).amax(0)
            ulp = torch.exp2(torch.floor(torch.log2(scale.clamp_min(1e-30))) - mantissa_bits)
            ulps = diff / ulp
            ranks = sorted({rank for density in densities
                            for rank in trim_ranks(method, density, x.numel())})
            if ranks and bool((ulps > 1).any()):
                tied = _at_trim_thresholds(name, base, tuned_folders, ranks)
                tied_entries += int(((ulps > 1) & tied).sum())
                ulps = ulps[~tied]
            if ulps.numel():
                worst_ulps_elsewhere = max(worst_ulps_elsewhere, float(ulps.max()))
        for folder in tuned_folders:
            folder.close()
    return {"max_abs_diff": worst_all, "max_ulps_outside_ties": worst_ulps_elsewhere,
            "differing_entries_tied_at_threshold": tied_entries}


def _at_trim_thresholds(name: str, base: WeightFolder, tuned: list[WeightFolder],
                        ranks: list[int]) -> torch.Tensor:
    original = float32_of(base, name)
    tied = torch.zeros(original.shape, dtype=torch.bool)
    for folder in tuned:
        magnitude = (float32_of(folder, name) - original).abs()
        for rank in ranks:
            threshold = torch.kthvalue(magnitude.view(-1), magnitude.numel() - rank + 1).values
            tied |= magnitude == threshold
    return tied


def delta_statistics(merged: Path, base_dir: Path, tuned: list[Path],
                     weights: list[float]) -> dict[str, float]:
    """Over the whole model, of the merged delta (merged - base): the share of entries it
    changes, its norm relative to the task-arithmetic delta's, and its cosine with it."""
    changed = entries = 0
    squares = reference_squares = dot = 0.0
    with WeightFolder(merged) as out, WeightFolder(base_dir) as base:
        tuned_folders = [WeightFolder(p) for p in tuned]
        for name in out.tensors:
            original = float32_of(base, name).double()
            delta = float32_of(out, name).double() - original
            reference = sum(w * (float32_of(f, name).double() - original)
                            for f, w in zip(tuned_folders, weights))
            changed += int((delta != 0).sum())
            entries += delta.numel()
            squares += float((delta * delta).sum())
            reference_squares += float((reference * reference).sum())
            dot += float((delta * reference).sum())
        for folder in tuned_folders:
            folder.close()
    return {"changed_share": changed / entries,
            "norm_ratio": (squares / reference_squares) ** 0.5,
            "cosine": dot / (squares * reference_squares) ** 0.5}


def compare_random(ours: Path, theirs: Path, base_dir: Path, tuned: list[Path],
                   weights: list[float]) -> dict[str, float]:
    """The statistics of both merges and their largest relative difference."""
    mine = delta_statistics(ours, base_dir, tuned, weights)
    baseline = delta_statistics(theirs, base_dir, tuned, weights)
    figures = {**{f"ours_{k}": round(v, 5) for k, v in mine.items()},
               **{f"baseline_{k}": round(v, 5) for k, v in baseline.items()}}
    figures["max_relative_statistic_diff"] = max(abs(mine[k] / baseline[k] - 1) for k in mine)
    return figures


def spherical_reference(method: str, base: torch.Tensor, tuned: list[torch.Tensor],
                        weights: list[float], options: list[str]) -> torch.Tensor:
    """The method's result in float64, written from its definition (README's parity
    table): the value both tools approximate in float32."""
    taus = [t - base for t in tuned]

    def interpolate(a: torch.Tensor, b: torch.Tensor, t: float, dim: int | None,
                    linear_above: float, floor: float) -> torch.Tensor:
        x, y = (a.reshape(-1), b.reshape(-1)) if dim is None else (a, b)
        axis = -1 if dim is None else dim
        na = x.norm(dim=axis, keepdim=True)
        nb = y.norm(dim=axis, keepdim=True)
        cos = ((x * y).sum(axis, keepdim=True) / (na.clamp_min(floor) * nb.clamp_min(floor))
               ).clamp(-1, 1)
        theta = torch.arccos(cos)
        linear = cos.abs() > linear_above
        sine = torch.where(linear, torch.ones_like(theta), torch.sin(theta))
        first = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sine)
        second = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / sine)
        return (first * x + second * y).reshape(a.shape)

    if method == "slerp":
        t = float(options[options.index("--t") + 1])
        return interpolate(tuned[0], tuned[1], t, None, 0.9995, 0.0)
    if method == "nuslerp":
        t = weights[1] / sum(weights[:2])
        dim = None if "--no-flatten" not in options or base.dim() < 2 else (
            0 if "--row-wise" in options else -1)
        return base + interpolate(taus[0], taus[1], t, dim, 1 - 1e-16, 1e-7)
    if method == "multislerp":
        w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        flat = torch.stack([tau.reshape(-1) for tau in taus])
        norms = flat.norm(dim=1)
        units = flat / norms[:, None]
        mean = (w[:, None] * units).sum(0)
        return base + (mean / mean.norm() * float(norms @ w)).reshape(base.shape)
    # karcher: gradient steps on the sphere from the normalized mean, to convergence
    flat = torch.stack([t.reshape(-1) for t in tuned])
    norms = flat.norm(dim=1)
    units = flat / norms[:, None]
    mean = units.mean(0)
    mean /= mean.norm()
    for _ in range(100):
        dots = (units @ mean).clamp(-1, 1)
        theta = torch.arccos(dots)
        scale = torch.where(theta > 1e-12, theta / torch.sin(theta), torch.ones_like(theta))
        tangent = ((scale * (1 / len(tuned)))[:, None] * (units - dots[:, None] * mean)).sum(0)
        length = tangent.norm()
        if length < 1e-15:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * tangent / length
        mean /= mean.norm()
    return (mean * norms.mean()).reshape(base.shape)


def compare_reference(ours: Path, theirs: Path, base_dir: Path, tuned: list[Path],
                      method: str, weights: list[float], options: list[str]
                      ) -> dict[str, float]:
    """Each tool's largest distance from the float64 result, relative to the tensor's
    largest entry (the spherical methods normalize whole tensors, so their float32
    rounding scales with the tensor, and mergekit's float32 norms of large tensors
    are off by about 1e-5)."""
    worst = {"ours": 0.0, "baseline": 0.0}
    tolerance = 2.0 ** -22  # a few roundings to float32 (bfloat16: one rounding, 2^-8)
    with WeightFolder(ours) as a, WeightFolder(theirs) as b, WeightFolder(base_dir) as base:
        tuned_folders = [WeightFolder(p) for p in tuned]
        for name in a.tensors:
            if a.tensors[name].dtype == "BF16":
                tolerance = 2.0 ** -8
            inputs = [float32_of(f, name).double() for f in tuned_folders]
            reference = spherical_reference(method, float32_of(base, name).double(), inputs,
                                            weights, options)
            scale = float(reference.abs().max()) or 1.0
            for label, folder in (("ours", a), ("baseline", b)):
                error = float((float32_of(folder, name).double() - reference).abs().max())
                worst[label] = max(worst[label], error / scale)
        for folder in tuned_folders:
            folder.close()
    return {"ours_max_relative_error": worst["ours"],
            "baseline_max_relative_error": worst["baseline"], "tolerance": tolerance}


def agreement_text(method: str, agreement: dict[str, float]) -> tuple[str, bool]:
    """One line on how well the two outputs agree, and whether that meets the target."""
    if method in RANDOM:
        worst = agreement["max_relative_statistic_diff"]
        return (f"changed share {agreement['ours_changed_share']:.4f}/"
                f"{agreement['baseline_changed_share']:.4f}, norm ratio "
                f"{agreement['ours_norm_ratio']:.4f}/{agreement['baseline_norm_ratio']:.4f}, "
                f"cosine {agreement['ours_cosine']:.4f}/{agreement['baseline_cosine']:.4f} "
                f"(worst {worst:.2%})", worst <= 0.01)
    if method in TENSOR_ROUNDED:
        ours, theirs = agreement["ours_max_relative_error"], agreement["baseline_max_relative_error"]
        # Within float32 rounding of the reference, or no further from it than mergekit.
        return (f"distance from the float64 result (of the tensor's largest entry): behaviorc "
                f"{ours:.2e}, mergekit {theirs:.2e}",
                ours <= max(theirs, agreement["tolerance"]))
    ulps = agreement["max_ulps_outside_ties"]
    return (f"max |diff| {agreement['max_abs_diff']:.3g}, outside threshold ties {ulps:.2f} "
            f"ulp, tied entries differing {agreement['differing_entries_tied_at_threshold']}",
            ulps <= ULP_TOLERANCE.get(method, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--k", type=int, default=3, help="fine-tuned variants (default 3)")
    parser.add_argument("--density", type=float, default=0.2,
                        help="ties and dare (della and breadcrumbs use their own, see above)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtypes", default="bf16,fp32", help="bf16, fp32 or both (default)")
    parser.add_argument("--baseline", choices=("mergekit", "torch"), default="mergekit")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for both sides: mergekit's torch threads "
                             "(default 1: on a shared machine more threads wait on each other). "
                             "behaviorc computes on one thread whatever this says, and reads "
                             "and hashes its inputs on two more")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir())
                        / f"behaviorc-bench-mergekit-{MERGEKIT_VERSION}")
    parser.add_argument("--in-memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--weights", nargs="*", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_memory_worker:
        in_memory_merge(args)
        return

    # Both processes inherit this, so both run under the same thread count.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    size = SIZES[args.size]
    methods, dtypes = args.methods.split(","), args.dtypes.split(",")
    mergekit = ensure_mergekit(args.venv) if args.baseline == "mergekit" else None
    baseline = "mergekit" if mergekit else "torch in-memory"
    if args.baseline == "mergekit" and mergekit is None:
        print("mergekit could not be installed: the baseline is an in-memory torch merge")
    if not mergekit:
        methods = [m for m in methods if m in ("ties", "task_arithmetic")]

    with tempfile.TemporaryDirectory(prefix="behaviorc-bench-compose-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        models = {dtype: generate_models(root / dtype, size, args.k, dtype) for dtype in dtypes}
        # behaviorc records each input's sha256 and remembers it by the file's state: the
        # first merge of new models hashes them (timed here apart), later merges do not.
        hashing = time.perf_counter()
        for base, tuned in models.values():
            for folder in (base, *tuned):
                content_sha256(folder)
        hash_inputs_s = time.perf_counter() - hashing
        shapes = parameter_shapes(size)
        parameters = sum(torch.Size(s).numel() for _, s in shapes)
        print(f"size {args.size}: {parameters / 1e6:.1f}M parameters, K={args.k}, {', '.join(dtypes)}, "
              f"{args.threads} thread(s) each; models written in {time.perf_counter() - started:.1f} s")
        print(f"inputs hashed once for provenance, as a first merge of them does: "
              f"{hash_inputs_s:.1f} s (not in the times below)")
        figures: dict[str, object] = {"parameters_m": round(parameters / 1e6, 1),
                                      "hash_inputs_s": round(hash_inputs_s, 2),
                                      "load_average_before": round(os.getloadavg()[0], 2)}
        speedups: dict[str, float] = {}
        disagreeing = []
        for case in methods:
            method, options, first_own = CASES.get(case, (case, [], ""))
            density = DENSITIES.get(method, args.density)
            count = 2 if method in TWO_TERMS else args.k
            weights = ([1.0] * count if method in UNWEIGHTED else list(WEIGHTS[:count]))
            for dtype in dtypes:
                base, all_tuned = models[dtype]
                tuned = all_tuned[:count]
                label = f"{case}_{dtype}"
                ours_out, theirs_out = root / f"ours_{label}", root / f"theirs_{label}"
                ours_cmd = [sys.executable, "-m", "behaviorc.cli", "merge", str(base),
                            str(ours_out), "--method", method, *options]
                if METHODS_TRAITS[method].sparsify is not None:
                    ours_cmd += ["--density", str(density)]
                for index, (path, weight) in enumerate(zip(tuned, weights)):
                    ours_cmd += ["--add", f"{path}={weight}{first_own if index == 0 else ''}"]
                ours_s, ours_rss = run_measured(ours_cmd)
                if mergekit:
                    theirs_cmd = [str(mergekit), str(ours_out / "mergekit.yaml"),
                                  str(theirs_out), "--quiet"]
                else:
                    theirs_cmd = [sys.executable, __file__, "--in-memory-worker",
                                  "--base", str(base), "--models", *map(str, tuned),
                                  "--weights", *map(str, weights), "--method", method,
                                  "--density", str(density), "--out", str(theirs_out)]
                theirs_s, theirs_rss = run_measured(theirs_cmd)
                if method in RANDOM:
                    agreement = compare_random(ours_out, theirs_out, base, tuned, weights)
                elif method in TENSOR_ROUNDED:
                    agreement = compare_reference(ours_out, theirs_out, base, tuned, method,
                                                  weights, options)
                else:
                    own = float(first_own.split("=")[1]) if first_own else density
                    agreement = compare_exact(ours_out, theirs_out, base, tuned, method,
                                              sorted({density, own}))
                text, agrees = agreement_text(method, agreement)
                if not agrees:
                    disagreeing.append(label)
                speedups[label] = theirs_s / ours_s
                print(f"{case:>23} {dtype}: behaviorc {ours_s:6.1f} s {ours_rss:5.0f} MB | "
                      f"{baseline} {theirs_s:6.1f} s {theirs_rss:5.0f} MB | speedup "
                      f"{speedups[label]:4.1f}x | {text}{'' if agrees else ' DISAGREES'}",
                      flush=True)
                figures.update({
                    f"{label}_ours_s": round(ours_s, 2), f"{label}_baseline_s": round(theirs_s, 2),
                    f"{label}_ours_rss_mb": round(ours_rss),
                    f"{label}_baseline_rss_mb": round(theirs_rss),
                    f"{label}_speedup": round(speedups[label], 2),
                    **{f"{label}_{k}": (round(v, 6) if isinstance(v, float) else v)
                       for k, v in agreement.items()},
                })
                shutil.rmtree(ours_out)
                shutil.rmtree(theirs_out, ignore_errors=True)
        figures["load_average_after"] = round(os.getloadavg()[0], 2)
        figures["disagreeing"] = disagreeing
    # The target holds for every method: the headline is the one furthest from it.
    worst = min(speedups, key=speedups.__getitem__)
    print(f"slowest against {baseline}: {worst} at {speedups[worst]:.1f}x; "
          f"{'all agree' if not disagreeing else 'disagreeing: ' + ', '.join(disagreeing)}")
    print(json.dumps({
        "bench": "compose",
        "figures": {"baseline": baseline, "size": args.size, **figures},
        "headline": {"what": f"slowest method's merge wall time ({worst}), {baseline} / "
                             f"behaviorc ({args.size}, K={args.k})",
                     "ratio": round(speedups[worst], 2), "target": 5.0},
    }))


if __name__ == "__main__":
    main()
