{{/* The chart's name, or nameOverride. */}}
{{- define "kondense.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: fullnameOverride, the release name when it contains the chart name, or <release>-<chart>. */}}
{{- define "kondense.fullname" -}}
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

{{- define "kondense.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kondense.labels" -}}
helm.sh/chart: {{ include "kondense.chart" . }}
{{ include "kondense.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kondense
{{- end }}

{{/* Labels that select the operator pod (immutable once deployed). */}}
{{- define "kondense.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kondense.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "kondense.serviceAccountName" -}}
{{- default (include "kondense.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* The operator's ServiceAccount as a RoleBinding subject. */}}
{{- define "kondense.operatorSubject" -}}
- kind: ServiceAccount
  name: {{ include "kondense.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}

{{/* image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "kondense.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}

{{/* Namespaces that get the Job ServiceAccount, as a JSON list: jobNamespaces, else watchNamespaces, else the release namespace. */}}
{{- define "kondense.jobNamespaces" -}}
{{- .Values.jobNamespaces | default .Values.watchNamespaces | default (list .Release.Namespace) | uniq | toJson }}
{{- end }}

{{/* Framework rules, namespaced part: events about the objects the operator handles. */}}
{{- define "kondense.frameworkNamespacedRules" -}}
# The operator records events about the pipelines it handles, and reads the Job controller's
# FailedCreate events of a stage Job that has no pod (why: a missing PriorityClass, Pod Security).
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- end }}

{{/*
The application's rules: exactly the verbs the operator uses (tests/chart/test_chart_render.py
lists them with their callers; the tests in tests/cluster run with these rules). Never Secrets:
credentials reach pods only as secretKeyRef.
*/}}
{{- define "kondense.applicationRules" -}}
# kopf lists and watches pipelines, and patches their finalizer and its annotations
# (kondense.io/*: handler progress, the last handled spec); kondense patches the status.
- apiGroups: [kondense.io]
  resources: [compressionpipelines]
  verbs: [list, watch, patch]
- apiGroups: [kondense.io]
  resources: [compressionpipelines/status]
  verbs: [patch]
# Jobs block their pipeline's deletion (ownerReferences.blockOwnerDeletion), which the
# OwnerReferencesPermissionEnforcement admission plugin allows only with this.
- apiGroups: [kondense.io]
  resources: [compressionpipelines/finalizers]
  verbs: [update]
# Stage Jobs: created, watched (Job and pod indexes), deleted when superseded or stopped; never
# changed in place (a changed stage is a new Job).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, list, watch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The tail of a running stage's log: its progress (step/total, ETA) for status.stages[].progress.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# The headless Service of a distill stage on several nodes: its pods' DNS names, through which
# they reach torch's rendezvous. Created once (409: it exists), never read or changed; its owner
# reference removes it.
- apiGroups: [""]
  resources: [services]
  verbs: [create]
{{- end }}
