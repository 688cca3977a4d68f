{{/* Names ---------------------------------------------------------------------------------- */}}
{{- define "dreamframe.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dreamframe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* values key → Kubernetes name of each service */}}
{{- define "dreamframe.componentNames" -}}
coordinator: coordinator
plotLlm: plot-llm
styleTrainer: style-trainer
keyframeRenderer: keyframe-renderer
qaGenerator: qa-generator
trainer: trainer
evaluator: evaluator
{{- end -}}

{{- define "dreamframe.componentName" -}}
{{- $names := include "dreamframe.componentNames" . | fromYaml -}}
{{- index $names .key -}}
{{- end -}}

{{/* <fullname>-<component>, e.g. dreamframe-keyframe-renderer; call with (dict "root" $ "key" "keyframeRenderer") */}}
{{- define "dreamframe.componentFullname" -}}
{{- printf "%s-%s" (include "dreamframe.fullname" .root) (include "dreamframe.componentName" .) -}}
{{- end -}}

{{- define "dreamframe.serviceAccountName" -}}
{{- printf "%s-coordinator" (include "dreamframe.fullname" .) -}}
{{- end -}}

{{- define "dreamframe.secretName" -}}
{{- default (printf "%s-secrets" (include "dreamframe.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* Labels ------------------------------------------------------------------------------- */}}
{{/* Without the instance label: component resources add it through their selector labels. */}}
{{- define "dreamframe.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: dreamframe
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dreamframe.labels" -}}
{{ include "dreamframe.baseLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* call with (dict "root" $ "component" "keyframe-renderer") */}}
{{- define "dreamframe.selectorLabels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Images ------------------------------------------------------------------------------- */}}
{{- define "dreamframe.image" -}}
{{- $registry := .root.Values.global.imageRegistry -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.global.imageTag -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) .image $tag -}}
{{- else -}}
{{- printf "%s:%s" .image $tag -}}
{{- end -}}
{{- end -}}

{{/* Addresses ---------------------------------------------------------------------------- */}}
{{- define "dreamframe.address" -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "dreamframe.componentFullname" .) .root.Release.Namespace (int .root.Values.ports.grpc) -}}
{{- end -}}

{{- define "dreamframe.rendererTarget" -}}
{{- printf "dns:///%s-headless.%s.svc.cluster.local:%d" (include "dreamframe.componentFullname" (dict "root" . "key" "keyframeRenderer")) .Release.Namespace (int .Values.ports.grpc) -}}
{{- end -}}

{{- define "dreamframe.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s-minio.%s.svc.cluster.local:9000" (include "dreamframe.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "config.storage.endpoint is required when minio.enabled is false" .Values.config.storage.endpoint -}}
{{- end -}}
{{- end -}}

{{/* Renderer autoscaling ------------------------------------------------------------------- */}}
{{/* keda, hpa, builtin or off: services.keyframeRenderer.autoscaling.mode ("off" without a renderer). */}}
{{- define "dreamframe.rendererScaling" -}}
{{- $r := .Values.services.keyframeRenderer -}}
{{- if $r.enabled -}}{{ $r.autoscaling.mode }}{{- else -}}off{{- end -}}
{{- end -}}

{{/* The PromQL KEDA scales on: the pending frames of the release namespace's coordinator(s), summed
(followers report 0: the sum is the leader's count whatever services.coordinator.replicas). */}}
{{- define "dreamframe.pendingFramesQuery" -}}
{{- $p := .Values.services.keyframeRenderer.autoscaling.prometheus -}}
{{- default (printf "sum(dreamframe_render_frames_pending{namespace=%q})" .Release.Namespace) $p.query -}}
{{- end -}}

{{/* Coordinator leader election ----------------------------------------------------------- */}}
{{/* storage, kubernetes or off: config.coordinator.leader_election (DreamFrame's default: storage). */}}
{{- define "dreamframe.leaderElection" -}}
{{- (default dict .Values.config.coordinator).leader_election | default "storage" -}}
{{- end -}}

{{/* The coordination.k8s.io Lease the coordinators campaign for: config.coordinator.leader_lease_name,
or <fullname>-coordinator so that two releases in one namespace never share a leader. */}}
{{- define "dreamframe.leaderLeaseName" -}}
{{- (default dict .Values.config.coordinator).leader_lease_name | default (printf "%s-coordinator" (include "dreamframe.fullname" .)) -}}
{{- end -}}
