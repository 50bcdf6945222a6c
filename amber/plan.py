"""From a resource to the stage runs it needs: one pure function shared by `amber run` and the
operator, so both run the same stages with the same inputs and the same storage layout.

Storage layout under `{storage.uri}/{namespace}/{name}/`:
  {stage}/output/       the stage's committed result (COMMIT.json written last)
  {stage}/checkpoints/  step-NNNNNNNNNN/ folders, newest committed one wins on restart
  final/                the last model, diffusers format, with a model card (a whole
                        pipeline folder when the teacher is one: amber/publish.py)
and the run's own entries beside them (amber/layout.py: no stage may be named as one).
"""

from __future__ import annotations

import hashlib
import json

from pydantic import Field

from amber import lineage
from amber.api import AmberCompression, DataSpec, DeepSpeedSpec, StorageSpec, TeacherSpec
from amber.base import Model
from amber.stages import ResourceSpec, Stage

OUTPUT = "output"


class StageRun(Model):
    """Everything one stage's processes need: the trainer's `--config` file."""

    namespace: str
    name: str = Field(..., description="name: the AmberCompression's name.")
    index: int = Field(..., ge=0, description="index: position in the pipeline.")
    stage: Stage
    teacher: TeacherSpec
    data: DataSpec
    storage: StorageSpec
    deepspeed: DeepSpeedSpec
    resources: ResourceSpec
    model_from: str | None = Field(
        None, description="modelFrom: stage whose output model this stage starts from."
    )
    score_from: str | None = Field(
        None, description="scoreFrom: score stage whose kept layers prune uses."
    )
    data_from: str | None = Field(
        None, description="dataFrom: encode stage whose shards are the training data."
    )
    models_before: list[str] = Field(
        default_factory=list,
        description="modelsBefore: eval only: every model stage before it, in order (the "
        "models it judges beside the teacher's).",
    )
    spec_hash: str = Field("", description="specHash: changes when this stage must re-run.")

    @property
    def run_uri(self) -> str:
        return run_uri(self.storage.uri, self.namespace, self.name)


def torchrun_args(stage_type: str, config: str, processes: int, options: list[str]) -> list[str]:
    """torchrun's arguments for one stage: `processes` trainers on this node, each running
    `amber trainer <type> --config <config>`, after torchrun's own `options` (how the gang
    meets, where torchrun logs)."""
    return [
        *options,
        f"--nproc-per-node={processes}",
        "-m",
        "amber",
        "trainer",
        stage_type,
        "--config",
        config,
    ]


def accelerator_env(gpus: int) -> dict[str, str]:
    """What a stage's processes need to find their accelerator: DeepSpeed looks for a GPU
    and stops where there is none unless told to use the CPU (pods with `gpusPerPod: 0`,
    `amber run` on a machine without one)."""
    return {} if gpus else {"DS_ACCELERATOR": "cpu"}


def on_this_machine(port: int) -> list[str]:
    """The rendezvous of a gang on one machine, outside Kubernetes (`amber run`, tests)."""
    return ["--master-addr=127.0.0.1", f"--master-port={port}"]


def run_uri(storage_uri: str, namespace: str, name: str) -> str:
    """A resource's run folder: every stage's outputs, `final/`, the report, the lease."""
    return f"{storage_uri.rstrip('/')}/{namespace}/{name}"


def _digest(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(obj: AmberCompression) -> list[StageRun]:
    """The stage runs of a resource, in order, each with its inputs and spec hash.

    A stage's hash covers its own parameters, what it reads (teacher, data) and the hash of
    the stage it starts from, so a changed stage re-runs itself and everything after it,
    never the stages before it.
    """
    spec = obj.spec
    runs: list[StageRun] = []
    hashes: dict[str, str] = {}
    for link in lineage.walk(spec.pipeline()):
        stage = link.stage
        upstream = [hashes[n] for n in (link.model_from, link.score_from, link.data_from) if n]
        digest = _digest(
            stage.dump(), spec.teacher.dump(), spec.data.dump(), spec.deepspeed.dump(), upstream
        )
        hashes[stage.name] = digest
        runs.append(
            StageRun(
                namespace=obj.metadata.namespace,
                name=obj.metadata.name,
                index=link.index,
                stage=stage,
                teacher=spec.teacher,
                data=spec.data,
                storage=spec.storage,
                deepspeed=spec.deepspeed,
                resources=stage.resources or spec.resources,
                model_from=link.model_from,
                score_from=link.score_from,
                data_from=link.data_from,
                models_before=list(link.models_before),
                spec_hash=digest,
            )
        )
    return runs
