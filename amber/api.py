"""The `AmberCompression` resource (amber.dev/v1alpha1): spec and status types.

These models are the single source of truth: the CRD's OpenAPI schema is generated from them
(`amber.schema`), `amber run` validates a file with them, and the operator reads resources
through them. Field descriptions start with the field's JSON name (jobset convention) and end
up in `kubectl explain`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import ConfigDict, Field, field_serializer, field_validator, model_validator

from amber import presets
from amber.base import Model
from amber.pipeline import check_pipeline
from amber.stages import DNS_LABEL, ResourceSpec, Stage
from amber.teacher_config import QwenImageConfig

GROUP = "amber.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AmberCompression"
PLURAL = "ambercompressions"
SHORT_NAME = "amc"
QWEN_IMAGE_LAYERS = 60


def check_uri(uri: str) -> str:
    """A store URI every part of Amber can open: s3://bucket/prefix, file:///path or a plain
    path; never with credentials in it."""
    if "\x00" in uri:
        raise ValueError("a URI cannot hold a NUL byte")
    if "://" not in uri:
        return uri
    parsed = urlparse(uri)
    if parsed.scheme not in ("s3", "file"):
        raise ValueError(f"{uri!r}: only s3://, file:// and plain paths are supported")
    if "@" in parsed.netloc:
        raise ValueError(f"{parsed.scheme}:// with user info: credentials in a URI are refused")
    if parsed.scheme == "s3" and not parsed.netloc:
        raise ValueError(f"{uri!r} names no bucket; write s3://bucket/prefix")
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{uri!r}: file:// URIs name a local path (file:///path)")
    return uri


class SecretKeyRef(Model):
    """A Secret holding S3 credentials; keys are never written inline in a resource."""

    name: str = Field(..., min_length=1, description="name: the Secret in the same namespace.")
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID", description="accessKeyIdKey: key of the access key id."
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", description="secretAccessKeyKey: key of the secret key."
    )


class StorageSpec(Model):
    uri: str = Field(
        ...,
        min_length=1,
        description="uri: s3://bucket/prefix, file:///path or a plain path. Each resource "
        "writes under {uri}/{namespace}/{name}/.",
    )
    endpoint: str | None = Field(
        None, description="endpoint: S3 endpoint URL for non-AWS stores (MinIO, Ceph, ...)."
    )
    region: str | None = Field(None, description="region: S3 region.")
    credentials_secret: SecretKeyRef | None = Field(
        None, description="credentialsSecret: Secret with the S3 keys (never inline)."
    )

    @field_validator("uri")
    @classmethod
    def _scheme(cls, uri: str) -> str:
        return check_uri(uri)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{endpoint!r} is not an http(s):// URL")
        if parsed.username or parsed.password or "@" in parsed.netloc:
            raise ValueError("credentials in a URL are refused; use credentialsSecret")
        return endpoint


class TeacherSpec(Model):
    """The model being compressed: a diffusers folder, or (tests, tiny example) a config."""

    uri: str | None = Field(
        None,
        description="uri: a diffusers QwenImageTransformer2DModel folder (s3://, file:// or "
        "path) or a pipeline folder with a transformer/ subfolder.",
    )
    config: QwenImageConfig | None = Field(
        None,
        description="config: a QwenImageTransformer2DModel config (diffusers' snake_case "
        "keys and defaults); the teacher is randomly initialised from it with `seed` (for "
        "trying recipes, not for real runs).",
    )
    num_layers: int | None = Field(
        None,
        ge=2,
        description="numLayers: the teacher's depth; read from `config` when given, else "
        f"defaults to Qwen-Image's {QWEN_IMAGE_LAYERS}. Presets scale with it.",
    )
    seed: int = Field(0, description="seed: initialisation seed for a `config` teacher.")

    @field_serializer("config")
    def _given(self, config: QwenImageConfig | None) -> dict | None:
        # What the resource said, not diffusers' defaults: spec hashes stay as they were.
        return None if config is None else config.given()

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_uri(uri)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.uri is None) == (self.config is None):
            raise ValueError("exactly one of uri and config must be set")
        if self.config is not None:
            from_config = self.config.num_layers
            if self.num_layers not in (None, from_config):
                raise ValueError(
                    f"numLayers ({self.num_layers}) disagrees with "
                    f"config.num_layers ({from_config})"
                )
            self.__dict__["num_layers"] = from_config
        elif self.num_layers is None:
            self.__dict__["num_layers"] = QWEN_IMAGE_LAYERS
        return self


class SyntheticData(Model):
    """Random latents and text embeddings shaped for the teacher: for tests and tiny runs."""

    samples: int = Field(256, ge=1, description="samples: pairs generated.")
    latent_size: int = Field(
        8, ge=2, multiple_of=2, description="latentSize: latent side in VAE pixels (packed 2x2)."
    )
    text_tokens: int = Field(8, ge=1, description="textTokens: text sequence length.")
    seed: int = Field(0, description="seed: generator seed.")


class ShapesData(Model):
    """The shapes task: scenes of coloured shapes rendered at 32x32, their captions encoded
    with all-MiniLM-L6-v2 (the `quality` extra). It is what the committed demo teacher
    (`bench/quality/teacher`) was trained on; training rows come from the task's training
    combinations, held-out rows from combinations never trained on."""

    samples: int = Field(2048, ge=16, description="samples: training pairs rendered.")
    seed: int = Field(0, description="seed: which scenes and renderings are drawn.")
    judge_uri: str | None = Field(
        None,
        description="judgeUri: a folder with the task's judge (judge.safetensors and "
        "SHA256SUMS, as bench/quality holds them): the eval stage then draws every held-out "
        "combination with the teacher and each model stage's output and scores the pictures.",
    )

    @field_validator("judge_uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_uri(uri)


class DataSpec(Model):
    uri: str | None = Field(
        None, description="uri: image-text pairs (WebDataset tar shards or parquet) to encode."
    )
    cache_uri: str | None = Field(
        None,
        description="cacheUri: shards encoded before (an earlier run's encode/output), "
        "used when the pipeline has no encode stage.",
    )
    synthetic: SyntheticData | None = Field(
        None, description="synthetic: generate data instead of reading it."
    )
    shapes: ShapesData | None = Field(
        None, description="shapes: render the shapes task's pairs instead of reading data."
    )

    @field_validator("uri", "cache_uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_uri(uri)

    @model_validator(mode="after")
    def _some_source(self):
        given = [self.uri or self.cache_uri, self.synthetic, self.shapes]
        if sum(g is not None for g in given) != 1:
            raise ValueError("exactly one of uri (or cacheUri), synthetic and shapes must be set")
        return self


TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"  # Kubernetes' form of a time in a status (UTC, seconds)


def timestamp(when: datetime) -> str:
    """`when` (naive, UTC) as a status writes it."""
    return when.strftime(TIMESTAMP)


def parse_timestamp(text: str) -> datetime:
    """A status's time, naive UTC, as `timestamp` wrote it."""
    return datetime.strptime(text, TIMESTAMP)


class DeepSpeedSpec(Model):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="zeroStage: ZeRO partitioning stage.")
    offload: Literal["none", "cpu"] = Field(
        "none", description="offload: optimizer-state offload target."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="precision: training precision (fp32 master weights kept)."
    )
    activation_checkpointing: bool = Field(
        True, description="activationCheckpointing: recompute block activations in backward."
    )
    compile: bool = Field(
        True, description="compile: torch.compile each transformer block (GPUs, ZeRO < 3)."
    )

    def zero_stage_for(self, world: int) -> int:
        """The ZeRO stage a gang of `world` processes runs: one process has nothing to
        partition, and ZeRO's flat buffers would only cost time (its optimizer step measured
        3x slower than stage 0's on CPU), unless offloading, which needs ZeRO."""
        return self.zero_stage if world > 1 or self.offload == "cpu" else 0

    def compiles(self, zero_stage: int) -> bool:
        """Whether blocks are compiled (on GPUs) under `zero_stage`: ZeRO-3 gathers parameters
        in module hooks, which would break every compiled graph."""
        return self.compile and zero_stage < 3


class SchedulingSpec(Model):
    gang: Literal["none", "kueue", "volcano"] = Field(
        "none", description="gang: all-or-nothing scheduling integration."
    )
    queue_name: str | None = Field(
        None, description="queueName: Kueue LocalQueue or Volcano queue."
    )
    priority_class_name: str | None = Field(
        None, description="priorityClassName: PriorityClass of the stage pods."
    )

    @model_validator(mode="after")
    def _queue(self):
        if self.gang == "kueue" and not self.queue_name:
            raise ValueError("queueName is required when gang is kueue")
        return self


class FailurePolicy(Model):
    max_restarts: int = Field(3, ge=0, description="maxRestarts: failed attempts per stage.")
    backoff_seconds: int = Field(30, ge=0, description="backoffSeconds: first retry delay.")
    max_backoff_seconds: int = Field(
        900, ge=0, description="maxBackoffSeconds: cap of the doubling retry delay."
    )
    count_disruptions: bool = Field(
        False,
        description="countDisruptions: count preemption and node loss (DisruptionTarget) "
        "against maxRestarts.",
    )


class AmberCompressionSpec(Model):
    teacher: TeacherSpec = Field(..., description="teacher: the model to compress.")
    data: DataSpec = Field(..., description="data: training and calibration data.")
    storage: StorageSpec = Field(..., description="storage: where checkpoints and outputs go.")
    image: str = Field(
        "ghcr.io/amber-dev/amber-trainer:0.1.0", description="image: the trainer image."
    )
    resources: ResourceSpec = Field(
        default_factory=ResourceSpec, description="resources: default per-stage resources."
    )
    deepspeed: DeepSpeedSpec = Field(
        default_factory=DeepSpeedSpec, description="deepspeed: DeepSpeed settings."
    )
    preset: Literal["amber-10b", "amber-6b"] | None = Field(
        None, description="preset: a named recipe, scaled to the teacher's depth."
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="overrides: per preset stage name, fields that replace the preset's.",
    )
    stages: list[Stage] | None = Field(
        None, max_length=32, description="stages: the ordered stages, when no preset is used."
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="scheduling: gang scheduling."
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy, description="failurePolicy: restarts and backoff."
    )
    suspend: bool = Field(
        False, description="suspend: stop the running stage, keep checkpoints; false resumes."
    )

    @model_validator(mode="after")
    def _resolve(self):
        if (self.preset is None) == (self.stages is None):
            raise ValueError("exactly one of preset and stages must be set")
        if self.preset is None and self.overrides:
            raise ValueError("overrides only apply to a preset")
        stages = self.pipeline()
        problems = check_pipeline(stages, self.teacher.num_layers) + self._data_problems(stages)
        if self.deepspeed.zero_stage == 3:
            problems += [
                f"stages.{s.name}.ema: a moving average of the weights needs them whole on "
                "every GPU; set ema: 0 or deepspeed.zeroStage at most 2"
                for s in stages
                if getattr(s, "ema", 0) > 0
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _data_problems(self, stages: list[Stage]) -> list[str]:
        data, encode = self.data, any(s.makes_data for s in stages)
        if encode and not data.uri:
            return ["data.uri: the encode stage needs image-text pairs to encode"]
        if encode and data.cache_uri:
            return [
                "data.cacheUri: the encode stage writes the training data; drop cacheUri, "
                "or drop the encode stage to train on shards encoded before"
            ]
        if encode and not self.teacher.uri:
            return [
                "teacher.uri: the encode stage needs the teacher pipeline's VAE and "
                "text encoder (a pipeline folder with vae/, text_encoder/, tokenizer/)"
            ]
        if not encode and data.uri and not data.cache_uri:
            return ["data.uri: raw pairs need an encode stage first, or set data.cacheUri"]
        return []

    def pipeline(self) -> list[Stage]:
        """The ordered stages this spec runs: its own, or its preset's with overrides (and an
        encode stage first when data.uri holds pairs not encoded yet)."""
        if self.stages is not None:
            return list(self.stages)
        encode = self.data.uri is not None and self.data.cache_uri is None
        layers = self.teacher.num_layers
        return presets.build(self.preset, layers, self.overrides, encode=encode)


# Kubernetes' own metadata rules (apimachinery's validation), applied here too so that
# `amber run` refuses what `kubectl apply` would.
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ANNOTATIONS_BYTES = 256 * 1024


def key_problem(key: str) -> str | None:
    """Why `key` is not a label or annotation key (`[prefix/]name`), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        return f"key {key!r}: its prefix must be a DNS subdomain of at most 253 characters"
    if len(name) > 63 or not QUALIFIED_NAME.match(name):
        return (
            f"key {key!r}: its name must be 1-63 characters, letters, digits, '-', '_' or "
            "'.', starting and ending with a letter or digit"
        )
    return None


class ObjectMeta(Model):
    model_config = ConfigDict(**{**Model.model_config, "extra": "allow"})

    name: str = Field(..., min_length=1, max_length=63)
    namespace: str = Field("default", min_length=1, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", "namespace")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(f"{value!r} must be a DNS label (lower-case letters, digits, '-')")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        problems = [p for p in map(key_problem, labels) if p]
        problems += [
            f"value {value!r} of {key!r}: at most 63 characters, letters, digits, '-', '_' or "
            "'.', starting and ending with a letter or digit"
            for key, value in labels.items()
            if value and (len(value) > 63 or not QUALIFIED_NAME.match(value))
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return labels

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        problems = [p for p in map(key_problem, annotations) if p]
        size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
        if size > ANNOTATIONS_BYTES:
            problems.append(f"{size} bytes in all, over the {ANNOTATIONS_BYTES} Kubernetes allows")
        if problems:
            raise ValueError("; ".join(problems))
        return annotations


class AmberCompression(Model):
    """One compression run: a resource file, as `kubectl apply` and `amber run` read it."""

    model_config = ConfigDict(**{**Model.model_config, "extra": "ignore"})

    api_version: Literal["amber.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["AmberCompression"] = KIND
    metadata: ObjectMeta
    spec: AmberCompressionSpec


# --- status -------------------------------------------------------------------------------

# Queued: the stage's Job waits for its queue (Kueue) to admit its whole gang.
Phase = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]


class Condition(Model):
    """A Kubernetes-style condition; lastTransitionTime moves only when status flips."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class StageStatus(Model):
    name: str = Field(..., description="name: the stage.")
    type: str = Field(..., description="type: the stage type.")
    phase: Phase = Field("Pending", description="phase: of this stage.")
    spec_hash: str = Field("", description="specHash: the stage spec this status is about.")
    attempts: int = Field(0, description="attempts: Jobs started for this stage.")
    restarts: int = Field(0, description="restarts: failed attempts counted against the budget.")
    disruptions: int = Field(
        0, description="disruptions: preemptions (a pod's, or the queue's) and node losses."
    )
    last_failure: int = Field(0, description="lastFailure: the last attempt recorded as failed.")
    job: str | None = Field(None, description="job: the current attempt's Job.")
    admitted: bool = Field(
        False,
        description="admitted: the current attempt's Job has been seen running, not held by a "
        "queue (so a queue that suspends it again preempted it).",
    )
    start_time: str | None = Field(None, description="startTime: first attempt started.")
    completion_time: str | None = Field(None, description="completionTime: stage finished.")
    retry_after: str | None = Field(None, description="retryAfter: earliest next attempt.")
    progress: str | None = Field(None, description="progress: step/total of the running attempt.")
    samples_per_second: float | None = Field(
        None, description="samplesPerSecond: training samples a second, all processes."
    )
    estimated_remaining_seconds: int | None = Field(
        None, description="estimatedRemainingSeconds: of the running attempt, at its rate."
    )
    last_checkpoint: int | None = Field(None, description="lastCheckpoint: newest committed step.")
    output_uri: str | None = Field(None, description="outputUri: the committed output.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="metrics: key results.")
    message: str = Field("", description="message: what happened last.")


class AmberCompressionStatus(Model):
    phase: Phase = Field("Pending", description="phase: of the whole run.")
    current_stage: str | None = Field(None, description="currentStage: running or next stage.")
    progress: str | None = Field(None, description="progress: stages done and current step.")
    restarts: int = Field(0, description="restarts: counted failed attempts, all stages.")
    estimated_remaining_seconds: int | None = Field(
        None,
        description="estimatedRemainingSeconds: of the whole run, the stages after the running "
        "one at its rate in training samples (an estimate).",
    )
    eta: str | None = Field(None, description="eta: the same, for people (5m10s, 3h07m).")
    observed_generation: int | None = Field(None, description="observedGeneration.")
    final_uri: str | None = Field(None, description="finalUri: the final model folder.")
    report_uri: str | None = Field(None, description="reportUri: the run's report page.")
    stages: list[StageStatus] = Field(default_factory=list, description="stages: per stage.")
    conditions: list[Condition] = Field(default_factory=list, description="conditions.")
