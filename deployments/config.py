"""The application's configuration: what `serve_config.yaml` passes to `build_app` as `args`.

Every field has a default that runs on one machine: SQLite `tasks.db`, local files under
`public/files`, and — with no GPU or no real weights — the tiny random-weight models on CPU.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.auth import AuthSettings
from deployments.limits import LimitSettings
from deployments.lora_fetch import LoraSettings
from deployments.task_types import DEPLOYMENTS
from deployments.webhooks import WebhookSettings
from storage import InputSettings
from Wan2GP.parallel_plan import plan_degrees

logger = logging.getLogger("ray.serve")

TINY_DEFAULT_MODELS: dict[str, dict[str, str]] = {
    # The first entry is what `preload` loads; the *_22 task types run on the Wan 2.2 stand-ins.
    "T2V": {"t2v": "tiny-t2v", "i2v": "tiny-i2v", "flf2v": "tiny-flf2v", "t2v_22": "tiny-t2v-22",
            "i2v_22": "tiny-i2v-22"},
    "VACE": {"vace": "tiny-vace", "vace_22": "tiny-vace-22"},
    "Flux": {"flux": "tiny-flux", "flux_kontext": "tiny-flux-kontext"},
    "Image": {"qwen_image_edit": "tiny-qwen-image-edit", "qwen_image": "tiny-qwen-image-edit",
              "z_image": "tiny-z-image"},
}  # fmt: skip
REAL_DEFAULT_MODELS: dict[str, dict[str, str]] = {
    "T2V": {
        "t2v": "wan2.1-t2v-1.3b",
        "i2v": "wan2.1-i2v-14b-480p",
        "flf2v": "wan2.1-flf2v-14b-720p",
        "t2v_22": "wan2.2-t2v-a14b",
        "i2v_22": "wan2.2-i2v-a14b",
    },
    "VACE": {"vace": "wan2.1-vace-1.3b", "vace_22": "vace_14B_cocktail_2_2"},
    "Flux": {"flux": "flux.1-schnell", "flux_kontext": "flux.1-kontext-dev"},
    "Image": {
        "qwen_image_edit": "qwen-image-edit",
        "qwen_image": "qwen-image-edit",
        "z_image": "z-image-turbo",
    },
}


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=1.0, gt=0)


GpuView = Literal["replica", "own"]
GPU_VIEW_DESCRIPTION = (
    "the GPUs each rank worker of a multi-GPU replica sees: replica, all of its replica's (its own as its "
    "device), so that NCCL can use direct peer paths (NVLink) between the ranks, as Ray Train and vLLM let "
    "their workers; own, its own GPU alone, the view Ray gives a GPU actor"
)


class SplitConfig(BaseModel):
    """A family's second pool beside its 1-GPU replicas: replicas spanning several GPUs that split each video
    (`deployments.multi_gpu`). The dispatcher sends a task to one pool or the other by the family's queue
    length (`deployments.scheduling`, docs/performance.md "Scheduling on several GPUs")."""

    model_config = ConfigDict(extra="forbid")

    gpus_per_replica: int = Field(default=2, ge=2, description="GPUs one split replica spans")
    parallel_mode: Literal["cfg", "ulysses", "cfg+ulysses"] = Field(
        default="cfg", description="how a split replica divides a generation (Wan2GP/parallel.py)"
    )
    replicas: int = Field(default=1, ge=1, description="split replicas (each on its own GPUs)")
    num_cpus: float = Field(default=0.25, ge=0, description="CPU share of each rank worker")
    gpu_view: GpuView = Field(default="replica", description=GPU_VIEW_DESCRIPTION)

    @model_validator(mode="after")
    def _splittable(self) -> SplitConfig:
        _check_split("split.", self.parallel_mode, self.gpus_per_replica)
        return self


def _check_split(prefix: str, mode: str, gpus: int) -> None:
    """A mode / GPU count that cannot split is refused at load, naming both fields."""
    try:
        plan_degrees(mode, gpus)
    except ValueError as error:
        raise ValueError(
            f"{prefix}parallel_mode {mode!r} with {prefix}gpus_per_replica {gpus}: {error}"
        ) from None


class DeploymentConfig(BaseModel):
    """One family deployment (T2V, VACE, Flux): its models, its share of a GPU and how many replicas run it."""

    model_config = ConfigDict(extra="forbid")

    default_models: dict[str, str] | None = Field(
        default=None,
        description="family or task type -> model id; None picks tiny or real models by `models`",
    )
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPU share per replica; fractional lets families share one"
    )
    num_cpus: float = Field(default=0.25, ge=0)
    replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=1, ge=1, description="concurrent generations per replica")
    memory_profile: Literal["resident", "model_offload", "group_offload", "cpu"] = "resident"
    gpus_per_replica: int = Field(default=1, ge=1, description="GPUs one replica spans; >1 splits each video")
    parallel_mode: Literal["cfg", "ulysses", "cfg+ulysses"] = Field(
        default="cfg", description="how a multi-GPU replica splits a generation (Wan2GP/parallel.py)"
    )
    gpu_view: GpuView = Field(default="replica", description=GPU_VIEW_DESCRIPTION)
    device: str | None = Field(
        default=None, description="cuda, cuda:1, cpu; default cuda when the replica has one"
    )
    preload: bool = Field(default=False, description="load the family's first default model at start")
    # --- speed on one GPU (issue 21; Wan2GP/acceleration.py) ---
    compile: bool | Literal["auto"] = Field(
        default=False,
        description="regional torch.compile of the transformer blocks (first call per shape pays the compile); "
        "auto: on for a CUDA device with the resident memory profile, off elsewhere (CPU, offloading, "
        "multi-GPU replicas). Off by default until the served path is measured on a GPU with it on",
    )
    attention_backend: str | None = Field(
        default=None,
        description="a diffusers attention backend (native, _native_cudnn, flash, sage, ...); auto: time each "
        "one installed at load and keep the fastest exact one (acceleration.attention_choice has the times); "
        "None: diffusers' default. Each result records the one that ran (acceleration.attention_backend)",
    )
    vae_tiling: bool | Literal["auto"] = Field(
        default="auto",
        description="tile the Wan VAE decode: auto when its estimated peak exceeds the free GPU memory (each "
        "result records acceleration.vae_tiling); true always (least memory, slower); false never",
    )
    split: SplitConfig | None = Field(
        default=None,
        description="also run split replicas (several GPUs each) beside these 1-GPU ones; a short queue "
        "goes to them (latency), a longer one to the 1-GPU replicas (throughput)",
    )

    @model_validator(mode="after")
    def _split_beside_one_gpu_replicas(self) -> DeploymentConfig:
        if self.gpus_per_replica == 1:
            # They shape multi-GPU replicas only. (Compared with the defaults, not model_fields_set: the config
            # reaches the ingress as a dump with every field set.)
            for field in ("parallel_mode", "gpu_view"):
                if getattr(self, field) != type(self).model_fields[field].default:
                    raise ValueError(
                        f"{field}: applies to replicas spanning several GPUs, but gpus_per_replica is 1; "
                        "set gpus_per_replica > 1, or put it under split for a pool of such replicas"
                    )
        if self.gpus_per_replica > 1:
            _check_split("", self.parallel_mode, self.gpus_per_replica)
            if self.split is not None:
                raise ValueError(
                    f"split: goes beside 1-GPU replicas, but gpus_per_replica is {self.gpus_per_replica} "
                    "(every replica already splits); set gpus_per_replica: 1 or drop split"
                )
        return self

    @field_validator("attention_backend")
    @classmethod
    def _known_attention_backend(cls, name: str | None) -> str | None:
        from Wan2GP.acceleration import check_attention_backend

        return None if name is None else check_attention_backend(name)

    @model_validator(mode="after")
    def _compile_runs_here(self) -> DeploymentConfig:
        if self.compile is True and self.memory_profile != "resident":
            raise ValueError(f"compile: needs memory_profile 'resident', got {self.memory_profile!r}")
        return self

    @model_validator(mode="after")
    def _what_a_multi_gpu_replica_honours(self) -> DeploymentConfig:
        """Settings of 1-GPU replicas that a multi-GPU one would not honour are refused, naming the field."""
        if self.gpus_per_replica == 1:
            return self
        refusals = {
            "compile": (
                self.compile is True,
                "not available on multi-GPU replicas (gpus_per_replica > 1) yet",
            ),
            "attention_backend": (
                self.attention_backend is not None,
                "not available on multi-GPU replicas (gpus_per_replica > 1) yet",
            ),
            "memory_profile": (
                self.memory_profile != "resident",
                f"a multi-GPU replica keeps its model resident on every rank (offloading hooks would fight the "
                f"split's), got {self.memory_profile!r}",
            ),
            "vae_tiling": (
                self.vae_tiling is True,
                "a multi-GPU replica splits the VAE decode across its ranks instead of tiling it",
            ),
            "max_ongoing_requests": (
                self.max_ongoing_requests != 1,
                f"a multi-GPU replica runs one generation at a time (it holds all its GPUs), got "
                f"{self.max_ongoing_requests}",
            ),
            "num_gpus": (
                self.num_gpus != 0,
                "a multi-GPU replica takes one whole GPU per rank (gpus_per_replica); leave num_gpus out",
            ),
        }
        for field, (refused, why) in refusals.items():
            if refused:
                raise ValueError(f"{field}: {why}")
        return self

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    @property
    def replica_capacity(self) -> int:
        """Tasks this deployment's own replicas run at once."""
        return self.max_replicas * self.max_ongoing_requests

    @property
    def split_capacity(self) -> int:
        """Tasks the split replicas run at once (one each: a split generation holds all their GPUs)."""
        return self.split.replicas if self.split else 0

    @property
    def capacity(self) -> int:
        """How many tasks of this family the ingress may have in flight at once (both pools)."""
        return self.replica_capacity + self.split_capacity


# The family deployments whose models (Wan pipelines) a multi-GPU replica can split.
SPLITTABLE_DEPLOYMENTS = ("T2V", "VACE")


def split_deployment_name(family: str) -> str:
    """The Serve deployment of a family's split replicas."""
    return f"{family}-split"


class IngressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.1, ge=0)
    poll_interval_s: float = Field(default=0.5, gt=0, description="longest wait between claim attempts")
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    stale_after_s: float = Field(default=60.0, gt=0, description="requeue a task whose heartbeat is this old")
    max_attempts: int = Field(default=3, ge=1)
    progress_interval_s: float = Field(
        default=1.0, ge=0, description="write progress at most this often per task"
    )
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    fail_unknown_task_types: bool = Field(
        default=False,
        description="fail queued tasks no deployment serves instead of leaving them queued (off: other "
        "worker pools may share the table; unserved types show in /healthz and hwgp_unserved_queued)",
    )
    storage_retry_s: float = Field(
        default=300.0,
        ge=0,
        description="how long a finished artifact waits in memory for storage to take it (full disk, "
        "object store away) before the task is requeued",
    )
    complete_retry_s: float = Field(
        default=600.0,
        ge=0,
        description="how long a stored output's `Complete` write is retried while the database is away",
    )
    max_request_bytes: int = Field(default=2_000_000, gt=0)
    orchestration_capacity: int = Field(default=2, ge=0, description="multi-step tasks (DAGs) run at once")
    utility_capacity: int = Field(default=2, ge=0, description="CPU utility tasks run at once")
    max_waiting_for_inputs: int = Field(
        default=8,
        ge=1,
        description="generations claimed at once that download their inputs (they hold no GPU capacity meanwhile)",
    )
    threads: int = Field(
        default=16, ge=2, description="the thread pool for blocking store, storage and input-fetching calls"
    )


class AppConfig(BaseModel):
    """`args` of `deployments.app:build_app` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    db: str = Field(
        default="sqlite:///tasks.db", description="sqlite:///FILE or postgresql://…; $HWGP_DB wins"
    )
    storage: dict[str, Any] = Field(default_factory=dict, description="storage.StorageConfig fields")
    input_dirs: list[str] = Field(
        default_factory=list, description="local folders tasks may read inputs from"
    )
    models: Literal["auto", "tiny", "real"] = Field(
        default="auto", description="auto: real models when a GPU and their weights are present, else tiny"
    )
    models_dir: str | None = Field(default=None, description="extra model JSON folder ($HWGP_MODELS_DIR)")
    deployments: dict[str, DeploymentConfig] = Field(
        default_factory=lambda: {name: DeploymentConfig() for name in DEPLOYMENTS},
        description="the family deployments to run (T2V, VACE, Flux) and their resources",
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    loras: LoraSettings = Field(
        default_factory=LoraSettings, description="LoRAs named by URL: allowed or not, size caps"
    )
    webhooks: WebhookSettings = Field(
        default_factory=WebhookSettings, description="signed POSTs when tasks complete or fail"
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings, description="API keys (deployments/auth.py, docs/security.md)"
    )
    limits: LimitSettings = Field(
        default_factory=LimitSettings,
        description="work budget and list caps per task (deployments/limits.py)",
    )
    inputs: InputSettings = Field(
        default_factory=InputSettings,
        description="input fetching: allowlist, deadline, byte cap, download threads, cache size (storage/inputs.py)",
    )
    http_host: str | None = Field(
        default=None,
        description="the host the HTTP proxy listens on, when the app cannot ask Serve (checked against auth)",
    )

    @model_validator(mode="before")
    @classmethod
    def _families_alias(cls, data: Any) -> Any:
        """`families:` is the deprecated name of `deployments:` (a family is a model family now)."""
        if isinstance(data, dict) and "families" in data:
            if "deployments" in data:
                raise ValueError("families: deprecated name of deployments; give only deployments")
            logger.warning("config: `families:` is deprecated; rename it to `deployments:`")
            data = {("deployments" if key == "families" else key): value for key, value in data.items()}
        return data

    @model_validator(mode="after")
    def _known_deployments(self) -> AppConfig:
        unknown = set(self.deployments) - set(DEPLOYMENTS)
        if unknown:
            raise ValueError(
                f"deployments: unknown deployment(s) {sorted(unknown)}; known: {sorted(DEPLOYMENTS)}"
            )
        return self

    @model_validator(mode="after")
    def _splittable_families(self) -> AppConfig:
        """Only Wan pipelines split across GPUs (Wan2GP/parallel.py): the image families cannot."""
        for name, deployment in self.deployments.items():
            if name in SPLITTABLE_DEPLOYMENTS:
                continue
            if deployment.split is not None or deployment.gpus_per_replica > 1:
                field_name = "split" if deployment.split is not None else "gpus_per_replica"
                raise ValueError(
                    f"deployments.{name}.{field_name}: {name} models cannot be split across GPUs; only "
                    f"{', '.join(SPLITTABLE_DEPLOYMENTS)} (Wan pipelines) can"
                )
        return self
