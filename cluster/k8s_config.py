"""Typed `k8s` section of the run file: how a run is laid out on Kubernetes with KubeRay.

Everything here maps onto one value of the Helm chart `helm/raylm` (see `cluster.k8s_render`), so
one run file drives local, Ray-cluster and Kubernetes runs. Defaults are safe rather than minimal:
pods run as a non-root user with every capability dropped, because many clusters enforce the
`restricted` Pod Security Standard and a chart that only works as root is a chart nobody can install.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Kubernetes resource quantity (e.g. 500m, 2, 8Gi, 1.5).
QUANTITY = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)([numkMGTPE]|[KMGTPE]i)?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # KubeRay requires Ray object names to start with a letter


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecretKeyRef(_Section):
    """One key of an existing Kubernetes Secret (the chart never puts secret values in manifests)."""

    name: str = Field(..., pattern=DNS_SUBDOMAIN, description="Secret name")
    key: str = Field(..., min_length=1, description="key inside the Secret")


class Toleration(_Section):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Resources(_Section):
    """Requests and limits are set equal: Ray sizes a node from its limits, so a gap would oversubscribe."""

    cpu: str = Field("2", pattern=QUANTITY, description="CPU cores (request = limit)")
    memory: str = Field("8Gi", pattern=QUANTITY, description="memory (request = limit)")
    gpu: int = Field(0, ge=0, description="GPUs per pod (limit of gpu_resource_name)")


class ImageConfig(_Section):
    repository: str = Field("ghcr.io/raylm/raylm", description="image with raylm installed on rayproject/ray")
    tag: str = Field("0.1.0", min_length=1)
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    pull_secrets: list[str] = Field(default_factory=list, description="names of docker-registry Secrets")


class HeadConfig(_Section):
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    ray_start_params: dict[str, str] = Field(default_factory=dict, description="extra `ray start` flags")


class WorkerGroupConfig(_Section):
    name: str = Field("gpu", pattern=DNS_LABEL, max_length=40)
    replicas: int = Field(1, ge=0, description="initial worker pods")
    min_replicas: int = Field(0, ge=0, description="autoscaler floor")
    max_replicas: int = Field(4, ge=0, description="autoscaler ceiling")
    resources: Resources = Field(default_factory=lambda: Resources(cpu="8", memory="32Gi", gpu=1))
    gpu_resource_name: str = Field("nvidia.com/gpu", description="extended resource that counts GPUs")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    ray_start_params: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroupConfig:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"need min_replicas <= replicas <= max_replicas, got {self.min_replicas} <= "
                f"{self.replicas} <= {self.max_replicas}"
            )
        return self


class AutoscalerConfig(_Section):
    enabled: bool = Field(True, description="Ray in-tree autoscaler (enableInTreeAutoscaling)")
    idle_timeout_s: int = Field(60, ge=0, description="idle seconds before a worker pod is removed")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = "Default"


class StorageConfig(_Section):
    """Shared storage for checkpoints: a PVC on every pod, or an object-store `cluster.storage_path`."""

    pvc_claim_name: str | None = Field(None, description="PVC to mount (ReadWriteMany); None = object store")
    create_pvc: bool = Field(False, description="let the chart create the PVC")
    pvc_size: str = Field("100Gi", pattern=QUANTITY)
    storage_class_name: str | None = None
    mount_path: str = Field("/mnt/raylm", pattern=r"^/", description="where the PVC is mounted")


class GcsFaultToleranceConfig(_Section):
    enabled: bool = Field(False, description="keep GCS state in an external Redis so the head can restart")
    redis_address: str = Field("", description="host:port of the external Redis")
    redis_password_secret: SecretKeyRef | None = None

    @model_validator(mode="after")
    def _address(self) -> GcsFaultToleranceConfig:
        if self.enabled and not self.redis_address:
            raise ValueError("gcs_fault_tolerance.enabled needs redis_address (host:port)")
        return self


class JobConfig(_Section):
    """RayJob lifecycle (field names mirror the RayJob spec)."""

    shutdown_after_finishes: bool = Field(True, description="delete the Ray cluster when the job ends")
    ttl_seconds_after_finished: int = Field(
        600, ge=0, description="delete the RayJob this long after it ends (only with shutdown_after_finishes)"
    )
    backoff_limit: int = Field(0, ge=0, description="retries of the whole RayJob on failure")
    active_deadline_seconds: int | None = Field(None, ge=1, description="kill the job after this long")
    submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = "K8sJobMode"


class IngressConfig(_Section):
    enabled: bool = False
    class_name: str | None = None
    host: str = Field("", description="virtual host; empty = any")
    tls_secret_name: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict)


class EndpointConfig(_Section):
    """The Service (and optional Ingress) in front of the OpenAI-compatible endpoint."""

    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(8000, ge=1, le=65535)
    ingress: IngressConfig = Field(default_factory=IngressConfig)


class SecurityConfig(_Section):
    run_as_user: int = Field(1000, ge=1, description="non-root uid (the rayproject images use 1000)")
    run_as_group: int = Field(100, ge=0)
    fs_group: int = Field(100, ge=0)


class K8sConfig(_Section):
    """Where and how the run's Ray cluster lives on Kubernetes."""

    namespace: str = Field("default", pattern=DNS_LABEL)
    release_name: str | None = Field(
        None,
        pattern=DNS1035_LABEL,
        max_length=40,
        description="Helm release / object name (default: run_name)",
    )
    ray_version: str = Field("2.60.0", description="Ray version inside the image")
    image: ImageConfig = Field(default_factory=ImageConfig)
    service_account_name: str | None = None
    head: HeadConfig = Field(default_factory=HeadConfig)
    worker_groups: list[WorkerGroupConfig] = Field(default_factory=lambda: [WorkerGroupConfig()])
    autoscaler: AutoscalerConfig = Field(default_factory=AutoscalerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    gcs_fault_tolerance: GcsFaultToleranceConfig = Field(default_factory=GcsFaultToleranceConfig)
    api_key_secret: SecretKeyRef | None = Field(
        default_factory=lambda: SecretKeyRef(name="raylm-api-keys", key="api-keys"),
        description="Secret holding comma-separated API keys for the endpoint",
    )
    job: JobConfig = Field(default_factory=JobConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    config_mount_path: str = Field("/etc/raylm", pattern=r"^/", description="where run.yaml is mounted")
    labels: dict[str, str] = Field(default_factory=dict, description="extra labels on every object")

    @model_validator(mode="after")
    def _unique_groups(self) -> K8sConfig:
        names = [g.name for g in self.worker_groups]
        if len(names) != len(set(names)):
            raise ValueError(f"worker group names must be unique, got {names}")
        return self
