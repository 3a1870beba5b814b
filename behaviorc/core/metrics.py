"""Metric names: the one vocabulary that tasks report, `expect` accepts and the report and
dashboard show.

Each task kind declares the metrics it may report (`Task.reports`, one of the tuples
below); the executor refuses a result that carries any other name, so this list cannot
drift from what the tasks compute. The checker accepts in an `expect` line exactly the
metrics of the tasks a behavior lowers to.
"""

from __future__ import annotations

from behaviorc.core.vocabulary import REPLY_MODELS

METRICS: dict[str, str] = {
    # The behavior margin: mean per-token log-prob of the positive minus the negative
    # completion over held-out pairs.
    "margin_before": "behavior margin of the base model, steering off",
    "margin_steered": "behavior margin with the behavior's steering on",
    "margin_after": "behavior margin of the trained result, steering off",
    "steered_share": "share of the steered gain the trained weights carry without steering",
    "layer": "the layer `layers auto` chose to steer",
    "margin_teacher": ("behavior margin of a prompt teacher: the base model reading its system "
                       "prompt (and steered, for `distill steering + prompt`)"),
    "teacher_share": "share of the prompt teacher's margin gain the trained weights carry, no prompt",
    "separation": "how consistently the chosen layer separates the pairs (layers auto)",
    "layer_effect": "held-out margin gain of the layer `layers auto` chose",
    "layer_lift": ("held-out rise of the positives' log-prob per token when steering at the "
                   "layer `layers auto` chose: the part of the effect distillation can carry"),
    "steer_effect": "held-out margin gain of the steering at the strength used",
    "control_effect": "the same gain for a random direction of the same norm",
    "right_share": "share of held-out pairs whose margin the steering raised",
    "anti_steerable_share": "share of held-out pairs whose margin the steering lowered",
    "capability_before": "capability probe accuracy, steering off",
    "capability_steered": "capability probe accuracy, steering on",
    "capability_after": "capability probe accuracy of the trained model",
    "repetition_before": "share of repeated 3-grams in greedy replies, steering off",
    "repetition_steered": "share of repeated 3-grams in greedy replies, steering on",
    "projection_before": "activation-projection score of the base model's replies",
    "projection_steered": "activation-projection score of the steered model's replies",
    "projection_after": "activation-projection score of the trained model's replies",
    "strength": "the steering strength verification used (chosen by `strength auto`)",
    "text_broke": ("1 when the steered replies loop or lost distinct-2 against steering off, "
                   "whatever the margin (steer.verify); 0 when they read as text"),
    "strength_relative": ("the strength used as a share of a typical hidden state's norm at the "
                          "steered layer (the largest over the layers)"),
    "steer_warnings": "reasons not to trust the steering (the verdict; 0: none)",
    "general_nll_before": "mean NLL per token of general text, base model",
    "general_nll_steered": "mean NLL per token of general text, steering on",
    "general_nll_after": "mean NLL per token of general text, trained model",
    "loss_first": "training loss of the first step",
    "loss_last": "training loss of the last step",
    "steps_skipped": "optimizer steps skipped for a non-finite loss or gradient",
    "limiter_activations": "times APOLLO's norm-growth limiter scaled an update",
    "seconds_generate": "distillation: seconds sampling the steered model",
    "samples_generated": "distillation: replies sampled",
    "samples_kept": "distillation: replies kept as training examples",
    "samples_dropped": "distillation: teacher replies dropped as looping or broken",
    "sample_score": "distillation: mean steering score of the kept replies",
    "seconds_targets": "distillation: seconds computing the teacher's targets, its distributions "
                       "and steered activations (one process; on several, part of seconds_train)",
    "seconds_train": "distillation: seconds training (pauses for pushes excluded)",
    "served_margin_start": "hand-off: served margin when training starts",
    "served_margin_min": "hand-off: lowest served margin while training",
    "served_margin_end": "hand-off: served margin at the end (final weights, no steering)",
    "strength_end": "hand-off: served steering strength at the end",
    "pushes": "hand-off: weight pushes made while training",
    "seconds_push": "hand-off: seconds spent pushing",
    "push_ms": "milliseconds per push into the live servers",
    "requests_served": "probe requests answered while pushing",
    "requests_failed": "probe requests that failed while pushing (the claim is zero)",
    "energy_kept": "LoRA export: share of the weights' change (squared norm) the adapter "
                   "carries",
    "uncarried_energy": "LoRA export: share of the change in tensors LoRA cannot carry "
                        "(embeddings, norms, gates)",
    "tensors_changed": "tensors of a task vector (those that differ from the base)",
    "parameters_merged": "parameters a composition changed",
    # The reply table (evaluate.table): per model answering the held-out prompts, one
    # metric of each kind below, named `<kind>_<model>` (see REPLY_MODELS).
    **{f"{kind}_{model}": f"{what}, {whose}"
       for kind, what in (
           ("behavior_rate", "share of replies scored as showing the behavior (score >= 0.5)"),
           ("behavior_score", "mean behavior score of the replies (0..1)"),
           ("distinct_2", "mean distinct-2 of the replies (distinct word bigrams / bigrams)"),
           ("repeated_share", "mean share of repeated 3-grams per reply"),
           ("reply_nll", "mean per-token NLL of the replies under the base model"))
       for model, whose in (
           ("base", "base model"), ("prompted", "base model with the eval's system prompt"),
           ("steered", "steered model"), ("trained", "trained model, steering off"))},
    "reply_warnings": "reasons the reply table gives not to trust a model's text (0: none)",
    # An experiment's measured point (behaviorc.lab): not for `expect`.
    "rate": "share of sampled replies the testbed scorer counts as the behavior",
    "rate_stderr": "standard error of `rate`",
    "malformed": "share of sampled replies the scorer could not read",
    "margin": "behavior margin of the measured model",
    "general_nll": "mean NLL per token of general text, measured model",
    "arithmetic_accuracy": "share of the testbed's sums answered right (greedy)",
}

STEER_EXTRACT: tuple[str, ...] = ("layer", "separation", "layer_effect", "layer_lift")
STEER_BASE: tuple[str, ...] = ("margin_before", "general_nll_before", "capability_before",
                               "repetition_before")
STEER_VERIFY: tuple[str, ...] = (
    "margin_before", "margin_steered", "general_nll_before",
    "general_nll_steered", "steer_effect", "control_effect", "right_share",
    "anti_steerable_share", "capability_before", "capability_steered", "repetition_before",
    "repetition_steered", "projection_before", "projection_steered", "strength",
    "strength_relative", "text_broke", "steer_warnings")
TRAIN: tuple[str, ...] = (
    "loss_first", "loss_last", "steps_skipped", "limiter_activations", "margin_before",
    "margin_steered", "margin_after", "general_nll_before", "general_nll_after", "steered_share",
    "margin_teacher", "teacher_share", "capability_before", "capability_after",
    "seconds_generate", "samples_generated", "samples_kept", "samples_dropped", "sample_score",
    "seconds_targets",
    "seconds_train", "projection_before", "projection_steered", "projection_after",
    "served_margin_start", "served_margin_min", "served_margin_end",
    "strength_end", "pushes", "seconds_push", "push_ms", "requests_served", "requests_failed")
TASK_VECTOR: tuple[str, ...] = ("tensors_changed",)
COMPOSE: tuple[str, ...] = ("parameters_merged",)
DEPLOY: tuple[str, ...] = ("push_ms", "requests_served", "requests_failed")
LORA_EXPORT: tuple[str, ...] = ("energy_kept", "uncarried_energy")
EXPERIMENT_POINT: tuple[str, ...] = ("rate", "rate_stderr", "malformed", "margin", "general_nll",
                                     "arithmetic_accuracy")

REPLY_KINDS: tuple[str, ...] = ("behavior_rate", "behavior_score", "distinct_2", "repeated_share",
                                "reply_nll")


def reply_table(models: tuple[str, ...] = REPLY_MODELS) -> tuple[str, ...]:
    """The reply table's metrics for `models` (a subset of REPLY_MODELS)."""
    return tuple(f"{kind}_{model}" for model in models for kind in REPLY_KINDS) + ("reply_warnings",)


REPLY_TABLE: tuple[str, ...] = reply_table()

# What an `expect` in a behavior's eval section can name: the metrics of the tasks a
# behavior lowers to (training's answer the lasting effect, steering's the steered one).
STEER_EXPECTABLE: tuple[str, ...] = STEER_VERIFY + STEER_EXTRACT
EXPECTABLE: tuple[str, ...] = tuple(dict.fromkeys(STEER_EXPECTABLE + TRAIN + REPLY_TABLE))
