{{/* Names, labels and the values derived from several others. */}}

{{- define "kakuremichi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; Services and Secrets are named after it. Kept short enough for
"<fullname>-webhook" and "<fullname>-control-tls" to stay valid Service/Secret names. */}}
{{- define "kakuremichi.fullname" -}}
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

{{- define "kakuremichi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kakuremichi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kakuremichi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kakuremichi.labels" -}}
helm.sh/chart: {{ include "kakuremichi.chart" . }}
{{ include "kakuremichi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kakuremichi
{{- end }}

{{- define "kakuremichi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kakuremichi.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kakuremichi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kakuremichi.edgeImage" -}}
{{- printf "%s:%s" .Values.edgeImage.repository (default .Chart.AppVersion .Values.edgeImage.tag) }}
{{- end }}

{{/* The Service's in-cluster DNS name. */}}
{{- define "kakuremichi.serviceHost" -}}
{{- printf "%s.%s.svc" (include "kakuremichi.fullname" .) .Release.Namespace }}
{{- end }}

{{/* What the API server dials for the webhook. Not the Service's DNS name: kube-apiserver
does not resolve cluster DNS. By default the webhook Service's ClusterIP, which the kubelet puts
into the Pod's environment (service links) and expands in the args. */}}
{{/* The URL edges dial: controlUrl, else the Ingress's, else the in-cluster Service's. */}}
{{- define "kakuremichi.controlUrl" -}}
{{- if .Values.controlUrl }}
{{- .Values.controlUrl | trimSuffix "/" }}
{{- else if .Values.ingress.enabled }}
{{- printf "%s://%s" (ternary "https" "http" (gt (len .Values.ingress.tls) 0)) .Values.ingress.host }}
{{- else }}
{{- printf "%s://%s:%d" (ternary "https" "http" .Values.controlTLS.enabled) (include "kakuremichi.serviceHost" .) (int .Values.service.port) }}
{{- end }}
{{- end }}

{{- define "kakuremichi.controlTLSSecret" -}}
{{- default (printf "%s-control-tls" (include "kakuremichi.fullname" .)) .Values.controlTLS.existingSecret }}
{{- end }}

{{- define "kakuremichi.eabSecret" -}}
{{- default (printf "%s-acme-eab" (include "kakuremichi.fullname" .)) .Values.acme.eab.existingSecret }}
{{- end }}

{{/* Whether the operator gets an EAB HMAC key (from the chart's Secret or the user's). */}}
{{- define "kakuremichi.eabEnabled" -}}
{{- if or .Values.acme.eab.hmacKey .Values.acme.eab.existingSecret }}true{{ end }}
{{- end }}

{{/* Names of the generated control certificate, as a JSON object {"dns": [...], "ips": [...]}:
the Service's names, controlTLS.dnsNames/ipAddresses, and the host of an explicit controlUrl
(edges check the certificate against the host they dial). */}}
{{- define "kakuremichi.controlTLSNames" -}}
{{- $fullname := include "kakuremichi.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $dns := list $fullname (printf "%s.%s" $fullname $ns) (printf "%s.%s.svc" $fullname $ns) (printf "%s.%s.svc.cluster.local" $fullname $ns) }}
{{- $ips := list }}
{{- range .Values.controlTLS.dnsNames }}{{ $dns = append $dns . }}{{ end }}
{{- range .Values.controlTLS.ipAddresses }}{{ $ips = append $ips . }}{{ end }}
{{- if .Values.controlUrl }}
{{- $host := (urlParse .Values.controlUrl).host | regexFind "^(\\[[^]]*\\]|[^:]+)" | trimPrefix "[" | trimSuffix "]" }}
{{- if regexMatch "^[0-9.]+$|:" $host }}
{{- $ips = append $ips $host }}
{{- else if $host }}
{{- $dns = append $dns $host }}
{{- end }}
{{- end }}
{{- dict "dns" ($dns | uniq) "ips" ($ips | uniq) | toJson }}
{{- end }}
