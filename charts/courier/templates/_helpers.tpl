{{/* The release's full name, at most 63 characters. */}}
{{- define "courier.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels selecting the operator's pods. */}}
{{- define "courier.selectorLabels" -}}
app.kubernetes.io/name: courier-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "courier.labels" -}}
{{ include "courier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "courier.serviceAccountName" -}}
{{- default (include "courier.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/*
A CEL expression: the field at the dotted path under root, each step tested with has(), or
default where one is absent. E.g. dict "root" "object" "path" "spec.rebalance.mode" "default" "'Auto'".
*/}}
{{- define "courier.celFieldOr" -}}
{{- $field := .root -}}
{{- $checks := list -}}
{{- range splitList "." .path -}}
{{- $field = printf "%s.%s" $field . -}}
{{- $checks = append $checks (printf "has(%s)" $field) -}}
{{- end -}}
{{- join " && " $checks }} ? {{ $field }} : {{ .default }}
{{- end -}}

{{/*
A ValidatingAdmissionPolicy on courier.dev resources and its binding, which denies what the
policy refuses; with watchNamespace, in that namespace only. Takes dict "ctx" (the root
context), "name", "resources", "operations", and "spec" (its variables and validations, YAML).
*/}}
{{- define "courier.admissionPolicy" -}}
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {{ include "courier.fullname" .ctx }}-{{ .name }}
  labels:
    {{- include "courier.labels" .ctx | nindent 4 }}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: ["courier.dev"]
        apiVersions: ["*"]
        operations: {{ toJson .operations }}
        resources: {{ toJson .resources }}
  {{- .spec | nindent 2 }}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {{ include "courier.fullname" .ctx }}-{{ .name }}
  labels:
    {{- include "courier.labels" .ctx | nindent 4 }}
spec:
  policyName: {{ include "courier.fullname" .ctx }}-{{ .name }}
  validationActions: [Deny]
  {{- with .ctx.Values.watchNamespace }}
  matchResources:
    namespaceSelector:
      matchLabels:
        kubernetes.io/metadata.name: {{ . | quote }}
  {{- end }}
{{- end -}}

{{/*
A CEL expression: the names of the Secrets a CourierCluster (the root, object or oldObject)
names, each of which its pods mount or read, or the kubelet pulls its image with; keep in step
with operator/src/crd/cluster.rs.
*/}}
{{- define "courier.secretNames" -}}
{{- $root := . -}}
{{- $names := list -}}
{{- range list "spec.jwtSecret.name" "spec.pushSecret" "spec.media.s3.credentialsSecret" "spec.storage.foundationDb.clusterFileSecret.name" "spec.storage.foundationDb.clusterTokenSecret.name" -}}
{{- $names = append $names (printf "(%s)" (include "courier.celFieldOr" (dict "root" $root "path" . "default" "''"))) -}}
{{- end -}}
([{{ join ", " $names }}] + ({{ include "courier.celFieldOr" (dict "root" $root "path" "spec.storage.foundationDb.partitions" "default" "[]") }}).map(p, p.clusterFileSecret.name) + ({{ include "courier.celFieldOr" (dict "root" $root "path" "spec.imagePullSecrets" "default" "[]") }}).map(s, s.name)).filter(n, n != '')
{{- end -}}
