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

{{- define "raylm.storageEnabled" -}}
{{- if or .Values.storage.pvc.claimName .Values.storage.pvc.create -}}true{{- end -}}
{{- end -}}

{{- define "raylm.pvcName" -}}
{{- default (printf "%s-storage" (include "raylm.fullname" .)) .Values.storage.pvc.claimName -}}
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

{{- define "raylm.env" -}}
{{- if .Values.apiKeySecret.name }}
- name: {{ .Values.apiKeySecret.env }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKeySecret.name }}
      key: {{ .Values.apiKeySecret.key }}
{{- end }}
{{- end -}}

{{- define "raylm.volumeMounts" -}}
- name: run-config
  mountPath: {{ .Values.configMountPath }}
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if include "raylm.storageEnabled" . }}
- name: storage
  mountPath: {{ .Values.storage.mountPath }}
{{- end }}
{{- end -}}

{{/* /dev/shm as memory: Ray's object store needs more than the 64Mi container default. */}}
{{- define "raylm.volumes" -}}
- name: run-config
  configMap:
    name: {{ include "raylm.fullname" . }}-config
- name: dshm
  emptyDir:
    medium: Memory
{{- if include "raylm.storageEnabled" . }}
- name: storage
  persistentVolumeClaim:
    claimName: {{ include "raylm.pvcName" . }}
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
  {{- with $root.Values.serviceAccountName }}
  serviceAccountName: {{ . }}
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
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ printf "%s:%s" $root.Values.image.repository $root.Values.image.tag | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      resources:
        {{- include "raylm.resources" (dict "resources" $g.resources "gpuResourceName" $g.gpuResourceName) | nindent 8 }}
      {{- with include "raylm.env" $root | trim }}
      env:
        {{- . | nindent 8 }}
      {{- end }}
      {{- if .head }}
      ports:
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: serve, containerPort: {{ int $root.Values.serve.port }}}
      {{- else if eq $root.Values.mode "service" }}
      ports:
        - {name: serve, containerPort: {{ int $root.Values.serve.port }}}
      {{- end }}
      volumeMounts:
        {{- include "raylm.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "raylm.volumes" $root | nindent 4 }}
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
enableInTreeAutoscaling: {{ .Values.autoscaler.enabled }}
{{- if .Values.autoscaler.enabled }}
autoscalerOptions:
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
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- include "raylm.rayStartParams" (merge (dict "dashboard-host" "0.0.0.0") .Values.head.rayStartParams) | nindent 4 }}
  template:
    {{- include "raylm.podTemplate" (dict "root" . "group" .Values.head "head" true) | nindent 4 }}
workerGroupSpecs:
{{- range .Values.workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ int .replicas }}
    minReplicas: {{ int .minReplicas }}
    maxReplicas: {{ int .maxReplicas }}
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
