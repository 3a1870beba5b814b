"""The spec's closed word lists, each written once: the IR's fields are typed with them,
the checker offers their words (in its "did you mean" hints too), and the code that
dispatches on a word is held to them by a type checker.

Each list is written as a Literal type, so a type checker knows the words; its tuple is
taken from the type with `get_args`, never written again. (The merge methods are the
exception: each needs its traits, so their catalog, `core.merge_methods.METHODS`, holds
the names.)
"""

from __future__ import annotations

from typing import Literal, get_args

# Steering directions from paired differences (steer.extract says what each computes).
SteerMethod = Literal["mean_diff", "pca", "pca_diff", "pca_center"]
STEER_METHODS: tuple[SteerMethod, ...] = get_args(SteerMethod)

# Where a completion's hidden state is read: its last token, or the mean over its tokens.
ReadPosition = Literal["last", "mean"]
READ_POSITIONS: tuple[ReadPosition, ...] = get_args(ReadPosition)

# Which positions a behavior's steering adds to: every position (`all`), or only those
# whose output chooses a reply token (`generated`; defined once, in
# behaviorc.engine.protocol's docstring).
SteerPositions = Literal["all", "generated"]
STEER_POSITIONS: tuple[SteerPositions, ...] = get_args(SteerPositions)

# A direction's sign: the mean difference projects positively on it (`mean`), or most
# pairs' differences do (`vote`, repeng's rule).
Orientation = Literal["mean", "vote"]
ORIENTATIONS: tuple[Orientation, ...] = get_args(Orientation)

# The last layer read where steering adds (`before` the final norm) or after it, as
# transformers' hidden_states[-1] (repeng's reading).
FinalNormReading = Literal["before", "after"]
FINAL_NORM_READINGS: tuple[FinalNormReading, ...] = get_args(FinalNormReading)

OptimizerName = Literal["apollo", "apollo_mini", "adamw"]
OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)

# What a student learns from texts: their tokens (sft), or a model's next-token
# distribution on them (kl). A distillation's objective and a mix's anchor.
ObjectiveName = Literal["sft", "kl"]
OBJECTIVES: tuple[ObjectiveName, ...] = get_args(ObjectiveName)

LrSchedule = Literal["cosine", "constant"]
LR_SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)

# A training sequence's context: run without gradients (frozen) or trained through (full).
ContextMode = Literal["frozen", "full"]
CONTEXT_MODES: tuple[ContextMode, ...] = get_args(ContextMode)

# What `distill` learns from: the behavior's steering, a system prompt, or both.
Teacher = Literal["steering", "prompt"]
TEACHERS: tuple[Teacher, ...] = get_args(Teacher)

ScoreKind = Literal["markers", "projection", "judge"]
SCORE_KINDS: tuple[ScoreKind, ...] = get_args(ScoreKind)

# A behavior trained elsewhere: a fine-tuned model folder or a task-vector file.
ExternalKind = Literal["model", "task_vector"]
EXTERNAL_KINDS: tuple[ExternalKind, ...] = get_args(ExternalKind)

# The models a reply table answers with: the base model, the base model told the
# behavior in a system prompt, the steered model and the trained one (steering off).
ReplyModel = Literal["base", "prompted", "steered", "trained"]
REPLY_MODELS: tuple[ReplyModel, ...] = get_args(ReplyModel)

# Where a model's files come from: a built-in name, a local folder or a hub id.
ModelSourceKind = Literal["builtin", "folder", "hub"]

DType = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[DType, ...] = get_args(DType)

Device = Literal["cpu", "cuda", "auto"]
DEVICES: tuple[Device, ...] = get_args(Device)

ChatRole = Literal["system", "user", "assistant", "tool"]
CHAT_ROLES: tuple[ChatRole, ...] = get_args(ChatRole)
