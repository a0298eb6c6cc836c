{{/* Names: <release>-inferline, and one per stage: <release>-inferline-<stage>. */}}
{{- define "inferline.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "inferline.stageName" -}}
{{- printf "%s-%s" (include "inferline.fullname" .root) .stage -}}
{{- end -}}

{{- define "inferline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inferline
{{- end -}}

{{- define "inferline.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
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
