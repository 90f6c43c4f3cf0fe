{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "chatbot-training.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the release name, prefixed with the chart name unless it holds it.
*/}}
{{- define "chatbot-training.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the operator's Deployment, Service and (cluster) role objects.
*/}}
{{- define "chatbot-training.operatorName" -}}
{{- printf "%s-operator" (include "chatbot-training.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chatbot-training.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "chatbot-training.labels" -}}
helm.sh/chart: {{ include "chatbot-training.chart" . }}
{{ include "chatbot-training.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatbot-training
{{- end }}

{{/*
Selector labels of the operator pods.
*/}}
{{- define "chatbot-training.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatbot-training.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "chatbot-training.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatbot-training.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
image reference from {repository, tag, digest}: digest wins, tag defaults to appVersion.
Usage: include "chatbot-training.image" (dict "image" .Values.image "root" .)
*/}}
{{- define "chatbot-training.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
Resources that exist only cluster-wide. Rules on them cannot be granted by a RoleBinding, so
in namespaced mode (watchNamespaces set) they go to a separate ClusterRole.
*/}}
{{- define "chatbot-training.clusterScopedResources" -}}
{{- list "namespaces" "customresourcedefinitions" "clusterkopfpeerings" "nodes" "persistentvolumes" "storageclasses" "priorityclasses" "runtimeclasses" "clusterroles" "clusterrolebindings" "mutatingwebhookconfigurations" "validatingwebhookconfigurations" "selfsubjectaccessreviews" "selfsubjectrulesreviews" | toJson }}
{{- end }}
