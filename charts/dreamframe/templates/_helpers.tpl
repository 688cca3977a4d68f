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

{{/* TLS --------------------------------------------------------------------------------------- */}}
{{/* cert-manager or helm: where the release's certificate comes from (tls.provider auto: cert-manager when
the cluster serves its API). */}}
{{- define "dreamframe.tlsProvider" -}}
{{- $p := .Values.tls.provider | default "auto" -}}
{{- if eq $p "auto" -}}
{{- if .Capabilities.APIVersions.Has "cert-manager.io/v1" }}cert-manager{{ else }}helm{{ end -}}
{{- else -}}
{{- $p -}}
{{- end -}}
{{- end -}}

{{- define "dreamframe.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "dreamframe.fullname" .)) .Values.tls.secretName -}}
{{- end -}}

{{/* Every name a service is dialled by (short, namespaced, .svc, FQDN; the renderer's headless Service
too), as a JSON list: the certificate's SANs. */}}
{{- define "dreamframe.tlsDnsNames" -}}
{{- $root := . -}}
{{- $names := list -}}
{{- range $key, $svc := .Values.services -}}
{{- if $svc.enabled -}}
{{- $base := include "dreamframe.componentFullname" (dict "root" $root "key" $key) -}}
{{- $hosts := list $base -}}
{{- if eq $key "keyframeRenderer" }}{{ $hosts = append $hosts (printf "%s-headless" $base) }}{{ end -}}
{{- range $hosts -}}
{{- $names = concat $names (list . (printf "%s.%s" . $root.Release.Namespace) (printf "%s.%s.svc" . $root.Release.Namespace) (printf "%s.%s.svc.cluster.local" . $root.Release.Namespace)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* The renderer's Service FQDN: the name the coordinator checks the certificate against when it dials
renderer pods by IP (discovery). The one certificate names every Service, so any of them would do. */}}
{{- define "dreamframe.tlsServerName" -}}
{{- printf "%s.%s.svc.cluster.local" (include "dreamframe.componentFullname" (dict "root" . "key" "keyframeRenderer")) .Release.Namespace -}}
{{- end -}}

{{/* Storage credentials ------------------------------------------------------------------------ */}}
{{- define "dreamframe.minioSecretName" -}}
{{- printf "%s-minio" (include "dreamframe.fullname" .) -}}
{{- end -}}

{{/* The Secret holding one service's S3 credentials (keys access-key, secret-key), or "" where the
service falls back to the shared secrets (external S3 without storage.credentials.<key>.existingSecret).
call with (dict "root" $ "key" "keyframeRenderer") */}}
{{- define "dreamframe.storageSecretName" -}}
{{- if .root.Values.minio.enabled -}}
{{- printf "%s-storage" (include "dreamframe.componentFullname" .) -}}
{{- else -}}
{{- (index (default dict .root.Values.storage.credentials) .key | default dict).existingSecret | default "" -}}
{{- end -}}
{{- end -}}

{{/* The bundled MinIO user of a service: its Kubernetes name. */}}
{{- define "dreamframe.storageUser" -}}
{{- include "dreamframe.componentName" . -}}
{{- end -}}

{{/* One service's S3 policy (JSON) from storage.access.<key>: list key names, read under its read patterns,
write (put, delete, multipart) under its write patterns, nothing else. call with (dict "root" $ "key" ...) */}}
{{- define "dreamframe.storagePolicy" -}}
{{- $bucket := .root.Values.config.storage.bucket -}}
{{- $access := index .root.Values.storage.access .key -}}
{{- $read := list -}}
{{- range $access.read }}{{ $read = append $read (printf "arn:aws:s3:::%s/%s" $bucket .) }}{{ end -}}
{{- $write := list -}}
{{- range $access.write }}{{ $write = append $write (printf "arn:aws:s3:::%s/%s" $bucket .) }}{{ end -}}
{{- /* Key names bucket-wide: without s3:ListBucket, S3 and MinIO answer a missing key with 403, not 404
(readiness and skip-what-exists need the 404). Contents stay limited to the read patterns. */ -}}
{{- $statements := list (dict "Sid" "Bucket" "Effect" "Allow" "Action" (list "s3:GetBucketLocation" "s3:ListBucket") "Resource" (list (printf "arn:aws:s3:::%s" $bucket))) -}}
{{- if $read -}}
{{- $statements = append $statements (dict "Sid" "Read" "Effect" "Allow" "Action" (list "s3:GetObject") "Resource" $read) -}}
{{- end -}}
{{- if $write -}}
{{- $statements = append $statements (dict "Sid" "Write" "Effect" "Allow" "Action" (list "s3:PutObject" "s3:DeleteObject" "s3:AbortMultipartUpload" "s3:ListMultipartUploadParts") "Resource" $write) -}}
{{- end -}}
{{- dict "Version" "2012-10-17" "Statement" $statements | toJson -}}
{{- end -}}

{{/* Callers ----------------------------------------------------------------------------------- */}}
{{/* The Secret with callers.yaml (every service's server.callers_file) and the tokens of the chart's own
identities (coordinator-token, helm-test-token, admin-token). */}}
{{- define "dreamframe.callersSecretName" -}}
{{- printf "%s-callers" (include "dreamframe.fullname" .) -}}
{{- end -}}

{{/* The chart's own callers, always there (auth is never off in the chart): name → {role, key}. */}}
{{- define "dreamframe.systemCallers" -}}
coordinator: {name: dreamframe-coordinator, role: submit, key: coordinator-token}
helmTest: {name: dreamframe-helm-test, role: read, key: helm-test-token}
{{- if .Values.systemCallers.admin }}
admin: {name: dreamframe-admin, role: admin, key: admin-token}
{{- end }}
{{- end -}}

{{/* Env of every DreamFrame server: its callers (the mounted callers.yaml; callers whose token is in a
Secret of yours, composed into DREAMFRAME_SERVER__CALLERS from their own env vars) and the deprecated
secrets.authTokens. */}}
{{- define "dreamframe.callersEnv" -}}
- name: DREAMFRAME_SERVER__CALLERS_FILE
  value: /etc/dreamframe/callers/callers.yaml
{{- $fromSecrets := list }}
{{- range $i, $c := .Values.callers }}
{{- if $c.existingSecret }}
{{- $var := printf "DREAMFRAME_CALLER_TOKEN_%d" $i }}
- name: {{ $var }}
  valueFrom: {secretKeyRef: {name: {{ $c.existingSecret }}, key: {{ $c.key | default "token" }}}}
{{- $fromSecrets = append $fromSecrets (dict "name" $c.name "team" $c.team "role" $c.role "token" (printf "$(%s)" $var)) }}
{{- end }}
{{- end }}
{{- if $fromSecrets }}
# Callers whose tokens are in your Secrets: the kubelet puts each token in place of its $(...).
- name: DREAMFRAME_SERVER__CALLERS
  value: {{ toJson $fromSecrets | quote }}
{{- end }}
{{- if or .Values.secrets.authTokens .Values.secrets.existingSecret }}
# Deprecated: each token an admin caller token-<n> of team default.
- name: DREAMFRAME_SERVER__AUTH_TOKENS
  valueFrom: {secretKeyRef: {name: {{ include "dreamframe.secretName" . }}, key: auth-tokens, optional: true}}
{{- end }}
{{- end -}}

{{/* Evaluator endpoint and judge keys ------------------------------------------------------------ */}}
{{/* The entries of config.evaluator.endpoints/judges whose API key is in a Secret (apiKeySecret: {name, key}),
as a YAML list of {secret, key, path}: each one mounted as the file endpoint-keys/<path> in the evaluator,
which reads it as the entry's api_key_file (configmap.yaml). */}}
{{- define "dreamframe.endpointKeysDir" -}}
/etc/dreamframe/endpoint-keys
{{- end -}}

{{- define "dreamframe.endpointKeys" -}}
{{- $evaluator := default dict .Values.config.evaluator -}}
{{- $found := list -}}
{{- range $kind := list "endpoints" "judges" -}}
{{- range $name, $entry := (index $evaluator $kind | default dict) -}}
{{- with $entry.apiKeySecret -}}
{{- $found = append $found (dict "secret" .name "key" .key "path" (printf "%s/%s" $kind $name)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $found -}}
{{- end -}}
