{{/* Names: <release>-inferline, and one per stage: <release>-inferline-<stage>;
     nameOverride replaces "inferline", fullnameOverride the whole prefix. */}}
{{- define "inferline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferline.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "inferline.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "inferline.stageName" -}}
{{- printf "%s-%s" (include "inferline.fullname" .root) .stage -}}
{{- end -}}

{{- define "inferline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "inferline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inferline
{{- end -}}

{{- define "inferline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .stage }}
{{- end -}}

{{- define "inferline.image" -}}
{{- $img := .root.Values.image -}}
{{- $name := printf "%s%s:%s" $img.prefix .image (default .root.Chart.AppVersion $img.tag) -}}
{{- if $img.registry -}}{{ printf "%s/%s" $img.registry $name }}{{- else -}}{{ $name }}{{- end -}}
{{- end -}}

{{- define "inferline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "inferline.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{/* The stage's address inside the cluster, as the controller (and the gateway) dial it: with
headless Services a dns:/// URI of the Service's name, which resolves to every ready pod and
which the channel re-resolves when a connection closes (max_connection_age). */}}
{{- define "inferline.target" -}}
{{- $s := index .root.Values.stages .stage -}}
{{- if .root.Values.service.headless -}}
{{- printf "dns:///%s.%s.svc:%v" (include "inferline.stageName" .) .root.Release.Namespace $s.port -}}
{{- else -}}
{{- printf "%s:%v" (include "inferline.stageName" .) $s.port -}}
{{- end -}}
{{- end -}}

{{/* What every pod of the chart shares: priority, spread (each constraint without a
     labelSelector gets the pod's own), extra volumes. Called with (dict "root" $ "stage" name). */}}
{{- define "inferline.podExtras" -}}
{{- $root := .root -}}
{{- with $root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range . }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "inferline.selectorLabels" $ | fromYaml)) }}
{{- end }}
  - {{ toYaml $c | nindent 4 | trim }}
{{- end }}
{{- end }}
{{- end -}}


{{/* The claims that models' pvc:// sources name (pvc://<claim>/<path>), each once, as a YAML list. */}}
{{- define "inferline.pvcClaims" -}}
{{- $claims := dict -}}
{{- range $src := .Values.models.sources -}}
{{- if hasPrefix "pvc://" $src.uri -}}
{{- $_ := set $claims (index (splitList "/" (trimPrefix "pvc://" $src.uri)) 0) true -}}
{{- end -}}
{{- end -}}
{{- toYaml (keys $claims | sortAlpha) -}}
{{- end -}}
