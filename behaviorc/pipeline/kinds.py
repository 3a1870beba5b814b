"""Every kind of task a plan can hold, by name: each capability's task classes.

The classes live beside the code they run (`behaviorc/<capability>/task.py`); lowering
imports them from there, and nothing they import reaches back into the build.
"""

from __future__ import annotations

from behaviorc.compose.task import (ComposeBehaviors, ExportLora, ExtractTaskVector, ImportModel,
                                    ImportTaskVector)
from behaviorc.core.task import Task
from behaviorc.deploy.task import DeployModel
from behaviorc.evaluate.task import AnswerPrompts, ReplyTable
from behaviorc.model.task import ResolveModel
from behaviorc.steer.task import ExtractSteering, MeasureBase, VerifySteering
from behaviorc.train.task import TrainBehavior

TASK_KINDS: dict[str, type[Task]] = {
    cls.kind: cls
    for cls in (ResolveModel, ExtractSteering, MeasureBase, VerifySteering, TrainBehavior, ImportModel,
                ImportTaskVector, ExtractTaskVector, ComposeBehaviors, ExportLora, DeployModel, AnswerPrompts,
                ReplyTable)
}
