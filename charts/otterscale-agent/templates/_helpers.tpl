{{/* Names, labels and the derived settings every template shares. */}}

{{- define "otterscale-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "otterscale-agent.fullname" -}}
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

{{/* Cluster-scoped objects carry the namespace too: two releases may share a name. */}}
{{- define "otterscale-agent.clusterRoleName" -}}
{{- printf "%s:%s" .Release.Namespace (include "otterscale-agent.fullname" .) }}
{{- end }}

{{- define "otterscale-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "otterscale-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "otterscale-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "otterscale-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: otterscale
app.kubernetes.io/managed-by: {{ .Release.Service }}
otterscale.io/cluster: {{ .Values.cluster | quote }}
{{- end }}

{{- define "otterscale-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "otterscale-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "otterscale-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "otterscale-agent.secretName" -}}
{{- default (include "otterscale-agent.fullname" .) .Values.existingSecret.name }}
{{- end }}

{{- define "otterscale-agent.secretConfigKey" -}}
{{- if .Values.existingSecret.name }}{{ .Values.existingSecret.configKey }}{{ else }}secrets.yaml{{ end }}
{{- end }}

{{- define "otterscale-agent.apiPort" -}}
{{- int .Values.config.agent.api_port }}
{{- end }}

{{- define "otterscale-agent.cluster" -}}
{{- required "cluster is required: this cluster's name in the hub's configuration (clusters.<name>)" .Values.cluster }}
{{- end }}

{{/* The hub's tunnel port, from tunnelServerURL (explicit port, else 443 for https/wss, 80 for http/ws). */}}
{{- define "otterscale-agent.hubTunnelPort" -}}
{{- $url := urlParse .Values.tunnelServerURL }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- if $port }}{{ $port }}{{ else if has $url.scheme (list "https" "wss") }}443{{ else }}80{{ end }}
{{- end }}

{{/* The non-secret otterscale.yaml (the ConfigMap's content). */}}
{{- define "otterscale-agent.config" -}}
{{- $cluster := include "otterscale-agent.cluster" . }}
{{- $agent := .Values.config.agent }}
{{- if not $agent.auth.user }}
{{- fail "config.agent.auth.user is required: the tunnel user of this cluster (clusters.<cluster>.agent.auth.user in the hub's configuration)" }}
{{- end }}
{{- if kindIs "invalid" $agent.tunnel_port }}
{{- fail "config.agent.tunnel_port is required: this cluster's tunnel port on the hub (clusters.<cluster>.agent.tunnel_port in the hub's configuration)" }}
{{- end }}
{{- if and (not $agent.fingerprint) (not .Values.existingSecret.name) }}
{{- fail "config.agent.fingerprint is required: the hub's tunnel fingerprint, which the hub logs at start-up (the agent refuses to connect without it)" }}
{{- end }}
{{- $config := dict "keycloak" .Values.config.keycloak "tunnel" .Values.config.tunnel "clusters" (dict $cluster (dict "agent" $agent)) }}
{{- with .Values.config.runtime }}
{{- $_ := set $config "runtime" . }}
{{- end }}
{{- with .Values.config.audit }}
{{- $_ := set $config "audit" . }}
{{- end }}
{{- toYaml $config }}
{{- end }}
