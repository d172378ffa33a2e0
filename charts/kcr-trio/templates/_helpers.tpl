{{/* Chart name (or nameOverride), 63 characters at most. */}}
{{- define "kcr-trio.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fullname: <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "kcr-trio.fullname" -}}
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

{{- define "kcr-trio.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The KubeCodeRun release's fullname (A/B mode), by KubeCodeRun's own rule. */}}
{{- define "kcr-trio.kcrFullname" -}}
{{- $ab := .Values.abMode }}
{{- if $ab.kcrFullname }}
{{- $ab.kcrFullname | trunc 63 | trimSuffix "-" }}
{{- else if contains $ab.kcrChartName $ab.kcrRelease }}
{{- $ab.kcrRelease | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" $ab.kcrRelease $ab.kcrChartName | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Selector labels of the API pods. Standalone: our name + instance. A/B mode: the KubeCodeRun
release's name + instance (so its Service and NetworkPolicy include us) plus our variant label,
which keeps our Deployment's selector distinct from KubeCodeRun's.
*/}}
{{- define "kcr-trio.selectorLabels" -}}
{{- if .Values.abMode.enabled -}}
app.kubernetes.io/name: {{ .Values.abMode.kcrChartName }}
app.kubernetes.io/instance: {{ .Values.abMode.kcrRelease }}
{{- else -}}
app.kubernetes.io/name: {{ include "kcr-trio.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
kubecoderun.io/variant: trio
{{- end }}

{{/* Labels for our own objects (not the pods' selector). */}}
{{- define "kcr-trio.labels" -}}
helm.sh/chart: {{ include "kcr-trio.chart" . }}
app.kubernetes.io/name: {{ include "kcr-trio.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
kubecoderun.io/variant: trio
{{- end }}

{{- define "kcr-trio.serviceAccountName" -}}
{{- if .Values.abMode.enabled }}
{{- include "kcr-trio.kcrFullname" . }}
{{- else if .Values.serviceAccount.create }}
{{- default (include "kcr-trio.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kcr-trio.executionNamespace" -}}
{{- default .Release.Namespace .Values.execution.namespace }}
{{- end }}

{{- define "kcr-trio.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}
