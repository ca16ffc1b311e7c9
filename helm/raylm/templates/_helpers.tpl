{{/* Base name of every object: nameOverride or the release name (KubeRay appends suffixes, so keep it short). */}}
{{- define "raylm.fullname" -}}
{{- default .Release.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "raylm.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ include "raylm.fullname" . }}
{{- end -}}

{{- define "raylm.labels" -}}
{{ include "raylm.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels on the Ray object itself: Kueue admits RayJobs / RayClusters by their queue-name label. */}}
{{- define "raylm.rayObjectLabels" -}}
{{ include "raylm.labels" . }}
{{- with .Values.kueueQueue }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- end -}}

{{- define "raylm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "raylm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccountName -}}
{{- end -}}
{{- end -}}

{{- define "raylm.storageEnabled" -}}
{{- if or .Values.storage.pvc.claimName .Values.storage.pvc.create -}}true{{- end -}}
{{- end -}}

{{- define "raylm.pvcName" -}}
{{- default (default (printf "%s-storage" (include "raylm.fullname" .)) .Values.storage.pvc.name) .Values.storage.pvc.claimName -}}
{{- end -}}

{{/* Requests equal limits: Ray sizes a node from its container limits. */}}
{{- define "raylm.resources" -}}
{{- $r := .resources -}}
{{- $q := dict "cpu" (toString $r.cpu) "memory" (toString $r.memory) -}}
{{- if gt (int (default 0 $r.gpu)) 0 -}}
{{- $_ := set $q (default "nvidia.com/gpu" .gpuResourceName) (int $r.gpu) -}}
{{- end -}}
requests:
  {{- toYaml $q | nindent 2 }}
limits:
  {{- toYaml $q | nindent 2 }}
{{- end -}}

{{/* Env of a Ray container. Args: root (.), group. */}}
{{- define "raylm.env" -}}
{{- $root := .root -}}
{{- with $root.Values.apiKeySecret }}
{{- if .name }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with .group.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Args: root (.), group. */}}
{{- define "raylm.volumeMounts" -}}
- name: run-config
  mountPath: {{ .root.Values.configMountPath }}
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if include "raylm.storageEnabled" .root }}
- name: storage
  mountPath: {{ .root.Values.storage.mountPath }}
{{- end }}
{{- with .group.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* /dev/shm as memory: Ray's object store needs more than the 64Mi container default. */}}
{{- define "raylm.volumes" -}}
- name: run-config
  configMap:
    name: {{ include "raylm.fullname" .root }}-config
- name: dshm
  emptyDir:
    medium: Memory
{{- if include "raylm.storageEnabled" .root }}
- name: storage
  persistentVolumeClaim:
    claimName: {{ include "raylm.pvcName" .root }}
{{- end }}
{{- with .group.volumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod template of one Ray group. Args: root (.), group (head or worker group values), head (bool). */}}
{{- define "raylm.podTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "raylm.labels" $root | nindent 4 }}
spec:
  {{- with include "raylm.serviceAccountName" $root }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- with $root.Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ printf "%s:%s" $root.Values.image.repository $root.Values.image.tag | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      resources:
        {{- include "raylm.resources" (dict "resources" $g.resources "gpuResourceName" $g.gpuResourceName) | nindent 8 }}
      {{- with include "raylm.env" (dict "root" $root "group" $g) | trim }}
      env:
        {{- . | nindent 8 }}
      {{- end }}
      {{- with $g.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
      {{- if .head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: serve, containerPort: {{ int $root.Values.serve.port }}}
      {{- else if eq $root.Values.mode "service" }}
        - {name: serve, containerPort: {{ int $root.Values.serve.port }}}
      {{- end }}
        - {name: metrics, containerPort: 8080}
      volumeMounts:
        {{- include "raylm.volumeMounts" (dict "root" $root "group" $g) | nindent 8 }}
  volumes:
    {{- include "raylm.volumes" (dict "root" $root "group" $g) | nindent 4 }}
{{- end -}}

{{/* rayStartParams values must be strings in the CRD. */}}
{{- define "raylm.rayStartParams" -}}
{{- $out := dict -}}
{{- range $k, $v := . }}{{ $_ := set $out $k (toString $v) }}{{ end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The RayCluster spec shared by all three modes. */}}
{{- define "raylm.rayClusterSpec" -}}
rayVersion: {{ .Values.rayVersion | quote }}
{{- /* KubeRay creates the token Secret and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN in every Ray container */}}
authOptions:
  {{- if .Values.rayAuth.enabled }}
  mode: token
  {{- with .Values.rayAuth.secretName }}
  secretName: {{ . }}
  {{- end }}
  {{- else }}
  mode: disabled
  {{- end }}
enableInTreeAutoscaling: {{ .Values.autoscaler.enabled }}
{{- if .Values.autoscaler.enabled }}
autoscalerOptions:
  version: {{ .Values.autoscaler.version | default "v1" }}
  upscalingMode: {{ .Values.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ int .Values.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- include "raylm.resources" (dict "resources" (dict "cpu" "500m" "memory" "512Mi")) | nindent 4 }}
{{- end }}
{{- if .Values.gcsFaultTolerance.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ required "gcsFaultTolerance.redisAddress is required when gcsFaultTolerance.enabled" .Values.gcsFaultTolerance.redisAddress | quote }}
  {{- with .Values.gcsFaultTolerance.redisPasswordSecret }}
  {{- if .name }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ .name }}
        key: {{ .key }}
  {{- end }}
  {{- end }}
  {{- with .Values.gcsFaultTolerance.redisUsernameSecret }}
  {{- if .name }}
  redisUsername:
    valueFrom:
      secretKeyRef:
        name: {{ .name }}
        key: {{ .key }}
  {{- end }}
  {{- end }}
  {{- with .Values.gcsFaultTolerance.externalStorageNamespace }}
  externalStorageNamespace: {{ . | quote }}
  {{- end }}
{{- end }}
{{- $headParams := dict "dashboard-host" "0.0.0.0" -}}
{{- if eq .Values.mode "service" }}
{{- /* Serve replicas on workers: the head keeps the GCS, the controller and the proxy */}}
{{- $_ := set $headParams "num-cpus" "0" -}}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- include "raylm.rayStartParams" (merge (deepCopy .Values.head.rayStartParams) $headParams) | nindent 4 }}
  template:
    {{- include "raylm.podTemplate" (dict "root" . "group" .Values.head "head" true) | nindent 4 }}
workerGroupSpecs:
{{- range .Values.workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ int .replicas }}
    minReplicas: {{ int .minReplicas }}
    maxReplicas: {{ int .maxReplicas }}
    {{- if hasKey . "idleTimeoutSeconds" }}
    idleTimeoutSeconds: {{ int .idleTimeoutSeconds }}
    {{- end }}
    rayStartParams:
      {{- include "raylm.rayStartParams" (default dict .rayStartParams) | nindent 6 }}
    template:
      {{- include "raylm.podTemplate" (dict "root" $ "group" . "head" false) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Ray Serve config (ServeDeploySchema): one application, deployment options passed through as given. */}}
{{- define "raylm.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $app := dict
    "name" .Values.serveAppName
    "import_path" .Values.serveImportPath
    "route_prefix" $s.route_prefix
    "args" (dict "model_path" $s.model_path "serve" $s)
    "deployments" .Values.serveDeployments -}}
{{- toJson (dict "http_options" (dict "host" "0.0.0.0" "port" (int $s.port)) "applications" (list $app)) -}}
{{- end -}}
