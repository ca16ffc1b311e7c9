"""Typed `k8s` section of the run file: how a run is laid out on Kubernetes with KubeRay.

Everything here maps onto one value of the Helm chart `helm/raylm` (see `cluster.k8s_render`), so
one run file drives local, Ray-cluster and Kubernetes runs. Defaults are safe rather than minimal:
pods run as a non-root user with every capability dropped, because many clusters enforce the
`restricted` Pod Security Standard and a chart that only works as root is a chart nobody can install.
"""

from __future__ import annotations

from typing import Any, Literal

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


RESERVED_VOLUMES = {"run-config", "dshm", "storage"}  # the chart's own pod volumes


class EnvVar(_Section):
    """A container env var: a literal value or a reference (`value_from` as in the Kubernetes EnvVar)."""

    name: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    value: str | None = None
    value_from: dict[str, Any] | None = Field(None, description="secretKeyRef / configMapKeyRef / fieldRef")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise ValueError(f"env {self.name}: set exactly one of value and value_from")
        return self


class PodOptions(_Section):
    """Scheduling and pod extras shared by the head and every worker group (Kubernetes field shapes)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict, description="pod affinity / anti-affinity")
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list, description="extra env of the Ray container")
    env_from: list[dict[str, Any]] = Field(default_factory=list, description="secretRef / configMapRef")
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="extra pod volumes")
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list, description="Ray container mounts")

    @model_validator(mode="after")
    def _mounts_have_volumes(self) -> PodOptions:
        names = {v.get("name") for v in self.volumes}
        for m in self.volume_mounts:
            if not m.get("name") or not m.get("mountPath"):
                raise ValueError(f"volume_mounts: each needs name and mountPath, got {m}")
        for v in self.volumes:
            if not v.get("name"):
                raise ValueError(f"volumes: each needs a name, got {v}")
        reserved = names & RESERVED_VOLUMES
        if reserved:
            raise ValueError(f"volumes: {sorted(reserved)} are the chart's own; allowed: other names")
        return self


class HeadConfig(PodOptions):
    resources: Resources = Field(default_factory=Resources)
    ray_start_params: dict[str, str] = Field(default_factory=dict, description="extra `ray start` flags")


class WorkerGroupConfig(PodOptions):
    name: str = Field("gpu", pattern=DNS_LABEL, max_length=40)
    replicas: int = Field(1, ge=0, description="initial worker pods")
    min_replicas: int = Field(0, ge=0, description="autoscaler floor")
    max_replicas: int = Field(4, ge=0, description="autoscaler ceiling")
    resources: Resources = Field(default_factory=lambda: Resources(cpu="8", memory="32Gi", gpu=1))
    gpu_resource_name: str = Field("nvidia.com/gpu", description="extended resource that counts GPUs")
    ray_start_params: dict[str, str] = Field(default_factory=dict)
    idle_timeout_s: int | None = Field(
        None, ge=0, description="this group's idle timeout (KubeRay: only with autoscaler version v2)"
    )

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
    version: Literal["v1", "v2"] = Field("v1", description="autoscalerOptions.version (KubeRay default v1)")
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
    redis_username_secret: SecretKeyRef | None = Field(None, description="Redis ACL user (Redis 6+)")
    external_storage_namespace: str | None = Field(
        None, min_length=1, description="key prefix in Redis; share it to let a new head adopt the old state"
    )

    @model_validator(mode="after")
    def _address(self) -> GcsFaultToleranceConfig:
        if self.enabled and not self.redis_address:
            raise ValueError("gcs_fault_tolerance.enabled needs redis_address (host:port)")
        return self


class RayAuthConfig(_Section):
    """Ray token authentication (KubeRay `authOptions`): on by default, as raylm's local clusters are.

    With `mode: token` KubeRay (>= 1.5, Ray >= 2.52) creates a Secret named after the RayCluster holding
    `auth_token`, and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN in every Ray container; `secret_name` names an
    existing Secret (key `auth_token`) instead, which stays the same across RayService upgrades.
    """

    enabled: bool = Field(True, description="false renders authOptions.mode=disabled: INSECURE")
    secret_name: str | None = Field(None, pattern=DNS_SUBDOMAIN, description="Secret with key auth_token")


class NetworkPeer(_Section):
    """Who may reach the head's Ray ports: pods matching these labels, in namespaces matching these labels."""

    pod_labels: dict[str, str] | None = Field(None, description="None = any pod (of the selected namespaces)")
    namespace_labels: dict[str, str] | None = Field(None, description="None = this namespace; {} = any")


class NetworkPolicyConfig(_Section):
    """A NetworkPolicy admitting the head's GCS / dashboard / client ports only from this run's own pods
    and `clients` (default: the KubeRay operator, which calls the dashboard for RayJob and RayService)."""

    enabled: bool = False
    clients: list[NetworkPeer] = Field(
        default_factory=lambda: [
            NetworkPeer(pod_labels={"app.kubernetes.io/name": "kuberay-operator"}, namespace_labels={})
        ]
    )


class UpgradeStrategyConfig(_Section):
    """RayService upgrades (spec.upgradeStrategy), rules as KubeRay's ValidateRayServiceSpec."""

    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = Field(
        "NewCluster", description="KubeRay's default: a new cluster, traffic switched once it is ready"
    )
    max_surge_percent: int = Field(100, ge=0, le=100, description="incremental: capacity added per step")
    step_size_percent: int | None = Field(None, ge=0, le=100, description="incremental: traffic per step")
    interval_s: int | None = Field(None, ge=1, description="incremental: seconds between traffic steps")
    gateway_class_name: str | None = Field(None, min_length=1, description="incremental: Gateway API class")

    @model_validator(mode="after")
    def _incremental(self) -> UpgradeStrategyConfig:
        if self.type != "NewClusterWithIncrementalUpgrade":
            return self
        missing = [
            f for f in ("step_size_percent", "interval_s", "gateway_class_name") if getattr(self, f) is None
        ]
        if missing:
            raise ValueError(f"type NewClusterWithIncrementalUpgrade needs {', '.join(missing)}")
        if self.step_size_percent > self.max_surge_percent:  # type: ignore[operator]
            raise ValueError("step_size_percent must be <= max_surge_percent")
        return self


class ServiceAccountConfig(_Section):
    """The pods' service account; annotations carry cloud identity (EKS IRSA `eks.amazonaws.com/role-arn`,
    GKE Workload Identity `iam.gke.io/gcp-service-account`) so pods reach s3:// or gs:// storage."""

    name: str | None = Field(None, pattern=DNS_SUBDOMAIN, description="default: the release name when create")
    create: bool = Field(False, description="let the chart create it (with `annotations`)")
    annotations: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _annotations_need_create(self) -> ServiceAccountConfig:
        if self.annotations and not self.create:
            raise ValueError("annotations apply only to a service account the chart creates: set create")
        return self


class PodMonitorConfig(_Section):
    """A Prometheus Operator PodMonitor scraping Ray's metrics port and the endpoint's /metrics."""

    enabled: bool = False
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$")
    labels: dict[str, str] = Field(default_factory=dict, description="labels your Prometheus selects on")


class JobConfig(_Section):
    """RayJob lifecycle (field names mirror the RayJob spec)."""

    shutdown_after_finishes: bool = Field(True, description="delete the Ray cluster when the job ends")
    ttl_seconds_after_finished: int = Field(
        600, ge=0, description="delete the RayJob this long after it ends (only with shutdown_after_finishes)"
    )
    backoff_limit: int = Field(0, ge=0, description="retries of the whole RayJob on failure")
    active_deadline_seconds: int | None = Field(None, ge=1, description="kill the job after this long")
    submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = "K8sJobMode"
    deletion_strategy: dict[str, Any] | None = Field(
        None,
        description="RayJob spec.deletionStrategy (onSuccess/onFailure or deletionRules); needs KubeRay's "
        "RayJobDeletionPolicy feature gate; checked against the operator's rules at render",
    )

    @model_validator(mode="after")
    def _deletion_keys(self) -> JobConfig:
        unknown = set(self.deletion_strategy or {}) - {"onSuccess", "onFailure", "deletionRules"}
        if unknown:
            raise ValueError(
                f"deletion_strategy: unknown keys {sorted(unknown)}; allowed: onSuccess, onFailure, "
                "deletionRules"
            )
        return self

    @model_validator(mode="after")
    def _ttl_needs_shutdown(self) -> JobConfig:
        # KubeRay's validateDeletionConfiguration; a default TTL is simply not rendered without shutdown.
        explicit = "ttl_seconds_after_finished" in self.model_fields_set
        if explicit and not self.shutdown_after_finishes and self.ttl_seconds_after_finished > 0:
            raise ValueError("ttl_seconds_after_finished needs shutdown_after_finishes: true (KubeRay rule)")
        return self


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
    ray_version: str = Field("2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+", description="Ray inside the image")
    image: ImageConfig = Field(default_factory=ImageConfig)
    service_account_name: str | None = Field(None, description="an existing service account")
    service_account: ServiceAccountConfig = Field(default_factory=ServiceAccountConfig)
    ray_auth: RayAuthConfig = Field(default_factory=RayAuthConfig)
    network_policy: NetworkPolicyConfig = Field(default_factory=NetworkPolicyConfig)
    upgrade_strategy: UpgradeStrategyConfig = Field(default_factory=UpgradeStrategyConfig)
    pod_monitor: PodMonitorConfig = Field(default_factory=PodMonitorConfig)
    priority_class_name: str | None = Field(None, pattern=DNS_SUBDOMAIN)
    scheduler_name: str | None = Field(None, min_length=1, description="e.g. volcano, yunikorn")
    runtime_class_name: str | None = Field(None, pattern=DNS_SUBDOMAIN, description="e.g. nvidia, gvisor")
    kueue_queue: str | None = Field(None, pattern=DNS_SUBDOMAIN, description="Kueue LocalQueue (queue-name)")
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

    @model_validator(mode="after")
    def _operator_rules(self) -> K8sConfig:
        """KubeRay's own runtime checks (utils/validation.go) that the config alone decides."""
        version = tuple(int(p) for p in self.ray_version.split(".")[:3])
        if self.ray_auth.enabled and version < (2, 52, 0):
            raise ValueError(f"ray_auth needs Ray >= 2.52.0, got ray_version {self.ray_version}")
        for g in self.worker_groups:
            v2 = self.autoscaler.enabled and self.autoscaler.version == "v2"
            if g.idle_timeout_s is not None and not v2:
                raise ValueError(f"worker group {g.name}: idle_timeout_s needs autoscaler v2")
        if self.upgrade_strategy.type == "NewClusterWithIncrementalUpgrade":
            if not self.autoscaler.enabled:
                raise ValueError("upgrade_strategy NewClusterWithIncrementalUpgrade needs autoscaler.enabled")
            if self.endpoint.ingress.enabled:
                raise ValueError(
                    "upgrade_strategy NewClusterWithIncrementalUpgrade routes through KubeRay's Gateway; "
                    "set endpoint.ingress.enabled: false"
                )
        if self.service_account.create and self.service_account_name:
            raise ValueError("with service_account.create, name it in service_account.name")
        for group in [self.head, *self.worker_groups]:
            for key in ("redis-password", "redis-username"):
                if key in group.ray_start_params:
                    raise ValueError(f"ray_start_params: {key} is set through gcs_fault_tolerance secrets")
        return self
