"""Does the GDN recurrent state become direction-shaped after training?

The measure. For each probe prompt p (held-out prompts of the behavior) and each Gated
DeltaNet layer l that sits after the steering layer, read the layer's recurrent state
S_l(p) (the [heads, key, value] matrix the layer carries forward after reading p) in four
models: the base model; the base model steered by the behavior's vector at the spec's
strength; the base model fine-tuned on the behavior; and the base model fine-tuned, with
the same settings, on a control (unrelated general texts, or `--control BEHAVIOR`).

    alignment_l(p) = cos( S_l^trained(p) - S_l^base(p),  S_l^steered(p) - S_l^base(p) )

compares, in the state's own space, how training moved the state with how the steering
direction moves it. Steering is the known "direction" of the behavior, so a high
alignment means training wrote that direction into what the recurrence carries; the
control's alignment (training that changes the weights as much but toward something
else) is the level to beat, since any fine-tune moves states somewhat. The answer is yes
when the behavior's mean alignment is above the control's with 95% bootstrap intervals
(over probes and seeds) that do not overlap.
"""

from __future__ import annotations

import argparse
from typing import Any

from behaviorc.core import ir
from behaviorc.core.diagnostics import BehaviorError
from behaviorc.lab import common
from behaviorc.measure.intervals import bootstrap_mean
from behaviorc.lab.measure import GdnStates

NAME = "gdn-state"
HELP = "do GDN recurrent states move along the steering direction after training?"
EPILOG = """\
example:
  behaviorc experiment gdn-state specs/testbed_listen.behavior --seeds 2 --probes 24
"""


def add_options(parser: argparse.ArgumentParser) -> None:
    common.add_common_options(parser)
    parser.add_argument("--control", help="a behavior of the spec to train as the control "
                                          "(default: the general texts, as an unrelated behavior)")
    parser.add_argument("--probes", type=int, default=24, help="probe prompts (default 24)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_counts(args)
    if args.probes < 1:
        raise BehaviorError(f"--probes must be at least 1, not {args.probes}")
    subject = common.load_subject(args.spec, args.behavior, args.score, needs_train=True,
                                  prompts=args.prompts)
    steering = subject.steering()
    steer = subject.behavior.steer
    prompts = _probes(subject, args.probes)
    control_examples = _control_examples(subject, args.control)
    layers = _gdn_layers_after_steering(subject, steering, args)
    seeds = list(range(args.seeds))
    base = GdnStates(name=f"{subject.behavior.name}[base]", model=subject.model, prompts=prompts)
    steered = GdnStates(name=f"{subject.behavior.name}[steered]", model=subject.model, steering=steering,
                        strength=steer.strength, prompts=prompts)
    trained, control = {}, {}
    for s in seeds:
        train = subject.train_point(f"seed={s}", seed=s, **common.train_changes(args))
        trained[s] = GdnStates(name=f"{subject.behavior.name}[trained,seed={s}]", model=subject.model,
                               weights=train, prompts=prompts)
        other = subject.train_point(f"control,seed={s}", seed=s, examples=control_examples, mix=None,
                                    **common.train_changes(args))
        control[s] = GdnStates(name=f"{subject.behavior.name}[control,seed={s}]", model=subject.model,
                               weights=other, prompts=prompts)
    done = common.run_points(args.out, [base, steered, *trained.values(), *control.values()], args.spec,
                             subject.plan.spec.sha256, jobs=args.jobs)

    def states(task: GdnStates):
        return _read_states(done[task.key].path("states"))

    return analyze(subject, layers, seeds, states(base), states(steered),
                   {s: states(t) for s, t in trained.items()}, {s: states(t) for s, t in control.items()},
                   args.control or "general texts", len(prompts), steer.strength)


def _gdn_layers_after_steering(subject: common.Subject, steering, args: argparse.Namespace) -> list[int]:
    """The GDN layers the experiment reads: those after the first steered layer. Checked
    before any training point runs, so a model without them is refused in seconds: the
    model first, then (when it has GDN layers) the steering vectors' layers."""
    decl = subject.model.decl

    def prepare(task) -> dict:
        return common.run_points(args.out, [task], args.spec, subject.plan.spec.sha256, jobs=args.jobs)

    model = prepare(subject.model)[subject.model.key].data
    gdn = [layer for layer, kind in enumerate(model["layer_kinds"]) if kind == "gdn"]
    if not gdn:
        raise BehaviorError(f"model `{decl.name}` ({decl.source}, {model['family']}, {model['num_layers']} "
                            "attention layers) has no Gated DeltaNet layers: gdn-state reads the recurrent state "
                            "those layers carry, and this model carries none", decl.loc,
                            hint='run it on a spec whose model has GDN layers, e.g. specs/testbed_listen.behavior '
                                 '(model base = "tiny-gdn-testbed")')
    steered = [int(layer) for layer in prepare(steering)[steering.key].data["layers"]]
    after = [layer for layer in gdn if layer > min(steered)]
    if not after:
        raise BehaviorError(f"no GDN layer comes after the steering layers ({', '.join(map(str, steered))}) of "
                            f"`{subject.behavior.name}`, so steering cannot move a recurrent state",
                            subject.behavior.steer.loc, hint="steer an earlier layer (e.g. `layers 0`)")
    return after


def _probes(subject: common.Subject, count: int) -> tuple[str, ...]:
    from behaviorc.model.testbed_corpus import chat_prompt

    prompts = [chat_prompt(u) for u in subject.users] or list(dict.fromkeys(p.prompt for p in subject.eval_pairs))
    if not prompts:
        raise BehaviorError(f"behavior `{subject.behavior.name}` has no eval pairs to take probe prompts from",
                            subject.behavior.loc, hint="add an eval section with pairs")
    return common.spread(prompts, count)


def _control_examples(subject: common.Subject, control: str | None) -> tuple[ir.Example, ...]:
    if control is not None:
        other = common.load_subject(subject.spec_path, control, "none", needs_train=True)
        if other.behavior.name == subject.behavior.name:
            raise BehaviorError("--control names the studied behavior itself; pick another one")
        return other.behavior.train.examples
    if not subject.general:
        raise BehaviorError(f"behavior `{subject.behavior.name}` has no general texts to train the control on",
                            subject.behavior.loc, hint="add `general` texts to its eval, or pass --control BEHAVIOR")
    return tuple(ir.Example(context="", response=text) for text in subject.general)


def _read_states(path) -> dict[int, Any]:
    from safetensors.torch import load_file

    return {int(name.split(".")[1]): tensor for name, tensor in load_file(str(path)).items()}


def _cosines(moved, direction) -> list[float]:
    import torch

    a, b = moved.flatten(1), direction.flatten(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).tolist()


def analyze(subject: common.Subject, layers: list[int], seeds: list[int], base, steered, trained, control,
            control_name: str, probes: int, strength: float) -> dict[str, Any]:
    rows = []
    for layer in layers:
        direction = steered[layer] - base[layer]
        behavior = [c for s in seeds for c in _cosines(trained[s][layer] - base[layer], direction)]
        other = [c for s in seeds for c in _cosines(control[s][layer] - base[layer], direction)]
        ours, theirs = bootstrap_mean(behavior), bootstrap_mean(other)
        rows.append({"layer": layer, "alignment": ours.as_dict(), "control_alignment": theirs.as_dict(),
                     "alignment_values": behavior, "control_values": other,
                     "state_change_norm": float(sum((trained[s][layer] - base[layer]).norm() for s in seeds) / len(seeds)),
                     "steer_change_norm": float(direction.norm()),
                     "above_control": ours.low > theirs.high,
                     "direction_shaped": ours.low > 0 and ours.low > theirs.high})
    return {"experiment": NAME, **common.describe(subject), "layers": layers, "seeds": seeds,
            "probes": probes, "strength": strength, "control": control_name, "points": rows,
            "direction_shaped": any(r["direction_shaped"] for r in rows)}


def summary(results: dict[str, Any]) -> str:
    lines = [f"# GDN state after training: `{results['behavior']}` on {results['model']}", ""]
    shaped = [r["layer"] for r in results["points"] if r["direction_shaped"]]
    if shaped:
        lines.append(f"**Answer:** yes: in GDN layer(s) {', '.join(map(str, shaped))} training moved the "
                     "recurrent state along the steering direction (alignment above 0) and more than the "
                     "control did (95% intervals do not overlap).")
    else:
        lines.append("**Answer:** not shown: in no GDN layer was the state change's alignment with the steering "
                     "direction both above 0 and above the control's (95% intervals).")
    lines += ["", "## The measure", "",
              "For each probe prompt p and GDN layer l after the steering layer: alignment = cos(S_trained - S_base, "
              "S_steered - S_base), where S is the layer's recurrent state after reading p, S_steered is read with "
              f"the behavior's steering vector at strength {results['strength']:g}, and S_trained after fine-tuning "
              "on the behavior. The control is the same fine-tune on "
              f"{results['control']}. Cosine is over the flattened [heads, key, value] state; random directions "
              "of that size have cosine near 0.", "",
              "| GDN layer | alignment (95% CI) | control (95% CI) | direction-shaped | mean |state change| | |steering change| |",
              "|---|---|---|---|---|---|"]
    for row in results["points"]:
        lines.append(f"| {row['layer']} | {common.fmt_interval(row['alignment'])} | "
                     f"{common.fmt_interval(row['control_alignment'])} | {'yes' if row['direction_shaped'] else 'no'} | "
                     f"{row['state_change_norm']:.4f} | {row['steer_change_norm']:.4f} |")
    lines += ["", f"{results['probes']} probe prompts x {len(results['seeds'])} training seeds; intervals resample "
              "the (probe, seed) cosines.", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any]) -> list[tuple[str, Any]]:
    def bars(figure) -> None:
        ax = figure.add_subplot()
        rows = results["points"]
        xs = range(len(rows))
        for offset, key, label in ((-0.2, "alignment", results["behavior"]),
                                   (0.2, "control_alignment", f"control: {results['control']}")):
            means = [r[key]["mean"] for r in rows]
            ax.bar([x + offset for x in xs], means, width=0.4, label=label,
                   yerr=[[m - r[key]["low"] for m, r in zip(means, rows)],
                         [r[key]["high"] - m for m, r in zip(means, rows)]], capsize=4)
        ax.set_xticks(list(xs), [f"GDN layer {r['layer']}" for r in rows])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("cos(training's state change, steering's)")
        ax.legend()
        ax.set_title("is the state change direction-shaped?")
    return [("gdn_alignment.png", bars)]
