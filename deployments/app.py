"""The application builder that `serve_config.yaml` imports: `deployments.app:build_app`.

serve run serve_config.yaml
serve run deployments.app:build_app db=postgresql://…   # args as key=value also work
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.serve import Application

from deployments.auth import check_exposure
from deployments.config import REAL_DEFAULT_MODELS, TINY_DEFAULT_MODELS, AppConfig, split_deployment_name
from deployments.generation import GenerationDeployment
from deployments.ingress import Ingress
from deployments.multi_gpu import MultiGpuGenerationDeployment, multi_gpu_options

logger = logging.getLogger("ray.serve")

# On a stop, Serve force-kills a replica `graceful_shutdown_timeout_s` after asking it to stop. The
# ingress needs `shutdown_grace_s` to let in-flight work finish plus time to hand the rest back, and a
# family replica must outlive the ingress's grace so a generation ends by cancel rather than by a kill.
SHUTDOWN_MARGIN_S = 10.0


def real_models_available(config: AppConfig) -> bool:
    """True when a GPU is there and every real default model's weights resolve without a download."""
    import torch

    from Wan2GP.catalog import Catalog
    from Wan2GP.errors import WeightsNotFound

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count()
    if not gpus:
        return False
    catalog = Catalog.load(config.models_dir)
    try:
        for name in config.deployments:
            for model_id in REAL_DEFAULT_MODELS[name].values():
                catalog.resolve_source(catalog.get(model_id).source)
    except WeightsNotFound as missing:
        logger.warning("real model weights missing, serving the tiny models: %s", missing)
        return False
    return True


def default_models_for(config: AppConfig) -> dict[str, dict[str, str]]:
    """Each family deployment's default models (family or task type -> model id)."""
    real = config.models == "real" or (config.models == "auto" and real_models_available(config))
    presets = REAL_DEFAULT_MODELS if real else TINY_DEFAULT_MODELS
    return {
        name: deployment.default_models or presets[name] for name, deployment in config.deployments.items()
    }


def gpu_shortfalls(config: AppConfig, node_gpus: list[float]) -> list[str]:
    """What of ``config`` cannot be placed on a cluster whose nodes have ``node_gpus`` GPUs each: a replica
    needing more GPUs on one node than any node has, or more GPUs in all than the cluster has. Such replicas
    wait for resources (a node an autoscaler may add), so these are warnings, not refusals."""
    largest, total = max(node_gpus, default=0.0), sum(node_gpus)
    problems, needed = [], 0.0
    for name, deployment in config.deployments.items():
        replicas = deployment.autoscaling.min_replicas if deployment.autoscaling else deployment.replicas
        pools = [
            (f"deployments.{name}.gpus_per_replica", deployment.gpus_per_replica, replicas)
            if deployment.gpus_per_replica > 1
            else (f"deployments.{name}.num_gpus", deployment.num_gpus, replicas)
        ]
        if deployment.split is not None:
            split = deployment.split
            pools.append(
                (f"deployments.{name}.split.gpus_per_replica", split.gpus_per_replica, split.replicas)
            )
        for field, per_replica, count in pools:
            needed += per_replica * count
            if per_replica > largest:
                problems.append(
                    f"{field}: a replica needs {per_replica:g} GPU(s) on one node, the largest node has "
                    f"{largest:g}: it waits until such a node joins"
                )
    if needed > total and not problems:
        problems.append(
            f"deployments: their replicas need {needed:g} GPU(s) in all, the cluster has {total:g}: "
            "some wait until GPUs free up or nodes join"
        )
    return problems


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies listen on, asked of the running Serve controller (None when no
    controller runs yet, e.g. a config validated offline)."""
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        return None
    try:
        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception as error:  # no controller to ask: the config's http_host is all there is
        logger.warning("cannot ask Serve which host it listens on: %s", error)
        return None
    return client.http_config.host if client is not None else None


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    # Listening beyond this machine without API keys is refused unless auth.mode: none says so.
    check_exposure(config.auth, serve_http_host() or config.http_host)
    defaults = default_models_for(config)
    if ray.is_initialized():  # serve run / serve deploy: say now what cannot be placed, naming the field
        nodes = [node["Resources"].get("GPU", 0.0) for node in ray.nodes() if node.get("Alive")]
        for problem in gpu_shortfalls(config, nodes):
            logger.warning("%s", problem)
    graceful_shutdown_timeout_s = config.ingress.shutdown_grace_s + SHUTDOWN_MARGIN_S
    handles = {}
    for name, deployment in config.deployments.items():
        preload = next(iter(defaults[name].values())) if deployment.preload else None
        common = {
            "default_models": defaults[name],
            "device": deployment.device,
            "models_dir": config.models_dir,
            "preload": preload,
        }
        if deployment.gpus_per_replica > 1:
            # One replica spans several GPUs: a placement group, one rank worker per GPU.
            options: dict[str, Any] = {
                "name": name,
                **multi_gpu_options(deployment.gpus_per_replica, cpus_per_rank=deployment.num_cpus),
                "max_ongoing_requests": deployment.max_ongoing_requests,
                "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
            }
        else:
            options = {
                "name": name,
                "max_ongoing_requests": deployment.max_ongoing_requests,
                "ray_actor_options": {"num_gpus": deployment.num_gpus, "num_cpus": deployment.num_cpus},
                "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
            }
        if deployment.autoscaling is not None:
            options["autoscaling_config"] = deployment.autoscaling.model_dump()
        else:
            options["num_replicas"] = deployment.replicas
        if deployment.gpus_per_replica > 1:
            handles[name] = MultiGpuGenerationDeployment.options(**options).bind(
                family=name,
                world_size=deployment.gpus_per_replica,
                mode=deployment.parallel_mode,
                gpu_view=deployment.gpu_view,
                cpus_per_rank=deployment.num_cpus,  # must match the bundles multi_gpu_options reserved
                **common,
            )
        else:
            handles[name] = GenerationDeployment.options(**options).bind(
                family=name,
                memory_profile=deployment.memory_profile,
                acceleration={
                    "compile": deployment.compile,
                    "attention_backend": deployment.attention_backend,
                    "vae_tiling": deployment.vae_tiling,
                },
                **common,
            )
        if deployment.split is not None:
            # The family's second pool, on GPUs of its own: the dispatcher picks a pool per task
            # (deployments/scheduling.py). One task at a time: a split generation holds all its GPUs.
            split = deployment.split
            handles[split_deployment_name(name)] = MultiGpuGenerationDeployment.options(
                name=split_deployment_name(name),
                **multi_gpu_options(split.gpus_per_replica, cpus_per_rank=split.num_cpus),
                num_replicas=split.replicas,
                graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
            ).bind(
                family=name,
                world_size=split.gpus_per_replica,
                mode=split.parallel_mode,
                gpu_view=split.gpu_view,
                cpus_per_rank=split.num_cpus,
                **common,
            )
    merged = {key: model for models in defaults.values() for key, model in models.items()}
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
    )
    return ingress.bind(config.model_dump(mode="json"), merged, handles)
