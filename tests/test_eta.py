"""Time left: the progress record's estimate, planned steps as the trainer counts them, the
ETA column's format, and the gauges the operator exports from a status."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from amber import eta
from amber.api import AmberCompressionStatus, StageStatus
from amber.records import ProgressRecord
from amber.stages import FuseStage


def test_the_record_counts_down_from_when_it_was_written():
    record = ProgressRecord(step=40, total=100, time=1000.0, steps_per_second=2.0)
    assert record.remaining_seconds(1000.0) == 30.0
    assert record.remaining_seconds(1012.0) == 18.0
    assert record.remaining_seconds(2000.0) == 0.0  # late, never negative
    assert ProgressRecord(step=1, total=100, time=1000.0).remaining_seconds(1000.0) is None
    # What a stage adds (loss, phase) travels with it; the file is camelCase.
    text = record.model_copy(update={"samples_per_second": 8.0}).model_dump_json(by_alias=True)
    assert '"stepsPerSecond":2.0' in text and '"samplesPerSecond":8.0' in text
    assert (
        ProgressRecord.model_validate_json('{"step":1,"total":2,"time":0,"loss":0.5}').loss == 0.5
    )


@pytest.mark.parametrize(
    ("single", "per_phase", "steps", "finetune"), [(5, 2, 10, 7), (4, 4, 3, 0), (9, 4, 1, 2)]
)
def test_fuse_plans_the_steps_its_trainer_takes(single, per_phase, steps, finetune):
    from amber_trainer.surgery import fuse

    stage = FuseStage(
        singleLayers=single, blocksPerPhase=per_phase, steps=steps, finetuneSteps=finetune
    )
    trained = len(fuse.phases(single, per_phase)) * steps + finetune  # as stages/fuse.py
    assert stage.planned_steps() == trained


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (42.4, "42s"),
        (59.6, "1m00s"),
        (310, "5m10s"),
        (11220, "3h07m"),
        (187200, "2d04h"),
    ],
)
def test_eta_column(seconds, shown):
    assert eta.human(seconds) == shown


def test_gauges_follow_the_resource_and_go_with_it():
    from amber_operator import conditions as c
    from amber_operator import metrics

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels)

    run = {"namespace": "ml", "resource": "gauged"}
    status = AmberCompressionStatus(
        stages=[
            StageStatus(name="score", type="score", phase="Succeeded"),
            StageStatus(
                name="finetune",
                type="finetune",
                phase="Running",
                progress="250/1000",
                samples_per_second=12.5,
                estimated_remaining_seconds=60,
            ),
        ],
        estimated_remaining_seconds=600,
    )
    metrics.set_resource("ml", "gauged", status)
    assert value("amber_stage_progress_ratio", **run, stage="finetune", type="finetune") == 0.25
    assert value("amber_stage_samples_per_second", **run, stage="finetune", type="finetune") == 12.5
    assert value("amber_stage_eta_seconds", **run, stage="finetune", type="finetune") == 60
    assert value("amber_pipeline_eta_seconds", **run) == 600
    status.stages[1].phase = "Succeeded"
    status.conditions = c.set_condition([], c.STALLED, True, c.STORAGE_UNAVAILABLE, "", "t", 1)
    metrics.set_resource("ml", "gauged", status)
    assert value("amber_stage_progress_ratio", **run, stage="finetune", type="finetune") is None
    assert value("amber_pipeline_eta_seconds", **run) is None
    assert value("amber_resource_stalled", **run, reason=c.STORAGE_UNAVAILABLE) == 1
    metrics.forget("ml", "gauged")  # deleted
    assert value("amber_resource_stalled", **run, reason=c.STORAGE_UNAVAILABLE) is None
