{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "spate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; pod names are "<fullname>-<ordinal>", so it stays well under 63. */}}
{{- define "spate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "spate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spate.headlessName" -}}
{{- printf "%s-headless" (include "spate.fullname" .) }}
{{- end }}

{{- define "spate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "spate.tokenSecretName" -}}
{{- default (printf "%s-token" (include "spate.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "spate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------- */}}

{{- define "spate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* part-of is constant: the ServiceMonitor takes the scrape job name ("spate") from it. */}}
{{- define "spate.labels" -}}
helm.sh/chart: {{ include "spate.chart" . }}
{{ include "spate.selectorLabels" . }}
app.kubernetes.io/version: {{ default .Chart.AppVersion .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spate
{{- end }}

{{/* Shutdown --------------------------------------------------------------------------------- */}}

{{/* Whole seconds the runtime may spend draining in-flight events after SIGTERM. */}}
{{- define "spate.drainSeconds" -}}
{{- div (add (int64 .Values.config.dispatch.drainTimeoutMs) 999) 1000 }}
{{- end }}

{{/* Grace the pod gets: the configured one, or drain + margin. */}}
{{- define "spate.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (include "spate.drainSeconds" . | int64) (int64 .Values.terminationGracePeriodMarginSeconds) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Autoscaling ---------------------------------------------------------------------------- */}}

{{/*
"keda", "hpa" or "none". `autoscaling.keda.enabled: auto` picks KEDA when the cluster serves
keda.sh/v1alpha1 (offline `helm template` never does) and triggers are configured.
*/}}
{{- define "spate.autoscalingMode" -}}
{{- $a := .Values.autoscaling }}
{{- $keda := toString $a.keda.enabled }}
{{- if not $a.enabled }}none
{{- else if eq $keda "true" }}keda
{{- else if eq $keda "false" }}hpa
{{- else if eq $keda "auto" }}
{{- if and (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") (gt (len $a.triggers) 0) }}keda{{ else }}hpa{{ end }}
{{- else }}
{{- fail (printf "autoscaling.keda.enabled must be true, false or auto, not %q" $keda) }}
{{- end }}
{{- end }}

{{/* Validation ------------------------------------------------------------------------------ */}}

{{/*
Every check that makes a release unsafe rather than merely unusual. Included by the
StatefulSet, so any failing check fails the whole render with a message saying what to fix.
*/}}
{{- define "spate.validate" -}}
{{- $drainMs := int64 .Values.config.dispatch.drainTimeoutMs }}
{{- $drainS := include "spate.drainSeconds" . | int64 }}
{{- $grace := include "spate.terminationGracePeriodSeconds" . | int64 }}
{{- if le $drainMs 0 }}
{{- fail "config.dispatch.drainTimeoutMs must be positive" }}
{{- end }}
{{- if lt $grace (add $drainS 5) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least the drain timeout config.dispatch.drainTimeoutMs (%d ms = %d s) plus 5 s for the final commit; otherwise Kubernetes kills pods mid-drain and their in-flight events are redone. Raise it to %d or more, or leave it null to derive it" $grace $drainMs $drainS (add $drainS 5)) }}
{{- end }}
{{- if and .Values.auth.token .Values.auth.existingSecret }}
{{- fail "set either auth.token or auth.existingSecret, not both" }}
{{- end }}
{{- if and .Values.auth.token (lt (len .Values.auth.token) 8) }}
{{- fail "auth.token must be at least 8 characters (the runtime refuses shorter tokens)" }}
{{- end }}
{{- $a := .Values.autoscaling }}
{{- $partitions := int64 $a.partitions }}
{{- if lt $partitions 1 }}
{{- fail "autoscaling.partitions must be the input topic's partition count (at least 1)" }}
{{- end }}
{{- $mode := include "spate.autoscalingMode" . }}
{{- if eq $mode "none" }}
{{- if gt (int64 .Values.replicaCount) $partitions }}
{{- fail (printf "replicaCount (%d) is above autoscaling.partitions (%d): a consumer group gives each partition to one pod, so the extra pods would idle" (int64 .Values.replicaCount) $partitions) }}
{{- end }}
{{- else }}
{{- $min := int64 $a.minReplicaCount }}
{{- $max := int64 $a.maxReplicaCount }}
{{- if gt $max $partitions }}
{{- fail (printf "autoscaling.maxReplicaCount (%d) is above autoscaling.partitions (%d): a consumer group gives each partition to one pod, so pods beyond the partition count would idle. Lower maxReplicaCount or add partitions to the topic" $max $partitions) }}
{{- end }}
{{- if lt $min 1 }}
{{- fail "autoscaling.minReplicaCount must be at least 1: the pods also serve the plugin API" }}
{{- end }}
{{- if gt $min $max }}
{{- fail (printf "autoscaling.minReplicaCount (%d) is above autoscaling.maxReplicaCount (%d)" $min $max) }}
{{- end }}
{{- if lt (int64 $a.scaleDown.stabilizationWindowSeconds) 0 }}
{{- fail "autoscaling.scaleDown.stabilizationWindowSeconds must not be negative" }}
{{- end }}
{{- if eq $mode "keda" }}
{{- if eq (len $a.triggers) 0 }}
{{- fail "autoscaling.keda.enabled is true but autoscaling.triggers is empty: list the plugins to scale on, e.g. [{plugin: order-totals, topic: orders}]" }}
{{- end }}
{{- range $i, $t := $a.triggers }}
{{- if not (and $t.plugin $t.topic) }}
{{- fail (printf "autoscaling.triggers[%d] needs both plugin and topic" $i) }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $mode "hpa" }}
{{- if not (and .Values.resources .Values.resources.requests .Values.resources.requests.cpu) }}
{{- fail "the CPU autoscaler (autoscaling.keda.enabled false, or auto without KEDA) needs resources.requests.cpu" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Runtime configuration ------------------------------------------------------------------- */}}

{{/*
spate.toml. Strings and string lists go through toJson (a JSON string is a TOML basic string);
integers through int64, since Helm holds numbers as floats (67108864 would print 6.7108864e+07).
*/}}
{{- define "spate.config" -}}
{{- $c := .Values.config -}}
# Rendered by the spate Helm chart from its values; the runtime refuses unknown keys.
data-dir = "/var/lib/spate"
workflow-topic = {{ $c.workflowTopic | toJson }}

[api]
listen = {{ printf "0.0.0.0:%d" (int64 $c.api.port) | toJson }}
max-body-bytes = {{ int64 $c.api.maxBodyBytes }}
max-upload-bytes = {{ int64 $c.api.maxUploadBytes }}
request-timeout-ms = {{ int64 $c.api.requestTimeoutMs }}

[events]
type = "kafka"
bootstrap-servers = {{ $c.events.bootstrapServers | toJson }}
group = {{ $c.events.group | toJson }}
create-topics = {{ $c.events.createTopics }}
partitions = {{ int64 $c.events.partitions }}
replication-factor = {{ int64 $c.events.replicationFactor }}
session-timeout-ms = {{ int64 $c.events.sessionTimeoutMs }}
revoke-timeout-ms = {{ int64 $c.events.revokeTimeoutMs }}
produce-timeout-ms = {{ int64 $c.events.produceTimeoutMs }}
request-timeout-ms = {{ int64 $c.events.requestTimeoutMs }}

[events.librdkafka]
{{- range $k, $v := $c.events.librdkafka }}
{{- /* librdkafka takes strings; a whole number written without quotes must not become 3e+04. */}}
{{- $s := $v }}
{{- if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) }}{{ $s = int64 $v }}{{ end }}
{{ $k | toJson }} = {{ toString $s | toJson }}
{{- end }}

[state]
type = "cql"
nodes = {{ $c.state.nodes | toJson }}
keyspace = {{ $c.state.keyspace | toJson }}
table = {{ $c.state.table | toJson }}
replication = {{ $c.state.replication | toJson }}
{{- if not (kindIs "invalid" $c.state.tablets) }}
tablets = {{ $c.state.tablets }}
{{- end }}
create-schema = {{ $c.state.createSchema }}
consistency = {{ $c.state.consistency | toJson }}
serial-consistency = {{ $c.state.serialConsistency | toJson }}
request-timeout-ms = {{ int64 $c.state.requestTimeoutMs }}
connect-timeout-ms = {{ int64 $c.state.connectTimeoutMs }}
scan-page-size = {{ int64 $c.state.scanPageSize }}
{{- if $c.state.username }}
username = {{ $c.state.username | toJson }}
{{- end }}

[cache]
type = "redis"
urls = {{ $c.cache.urls | toJson }}
cluster = {{ $c.cache.cluster }}
command-timeout-ms = {{ int64 $c.cache.commandTimeoutMs }}
connect-timeout-ms = {{ int64 $c.cache.connectTimeoutMs }}
retry-interval-ms = {{ int64 $c.cache.retryIntervalMs }}

[read-through]
enabled = {{ $c.readThrough.enabled }}
ttl-ms = {{ int64 $c.readThrough.ttlMs }}
on-write = {{ $c.readThrough.onWrite | toJson }}

[registry]
type = "shared"
control-topic = {{ $c.registry.controlTopic | toJson }}

[dispatch]
max-buffered = {{ int64 $c.dispatch.maxBuffered }}
max-buffered-per-partition = {{ int64 $c.dispatch.maxBufferedPerPartition }}
commit-interval-ms = {{ int64 $c.dispatch.commitIntervalMs }}
drain-timeout-ms = {{ int64 $c.dispatch.drainTimeoutMs }}

[sandbox]
max-memory-mb = {{ int64 $c.sandbox.maxMemoryMb }}
max-timeout-ms = {{ int64 $c.sandbox.maxTimeoutMs }}
max-concurrency = {{ int64 $c.sandbox.maxConcurrency }}
pool-instances = {{ int64 $c.sandbox.poolInstances }}
{{- end }}
