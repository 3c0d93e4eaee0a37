{{/* Names, labels and the derived settings every template shares. */}}

{{- define "otterscale-hub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "otterscale-hub.fullname" -}}
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

{{- define "otterscale-hub.tunnelServiceName" -}}
{{- printf "%s-tunnel" (include "otterscale-hub.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "otterscale-hub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "otterscale-hub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "otterscale-hub.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "otterscale-hub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: hub
app.kubernetes.io/part-of: otterscale
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "otterscale-hub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "otterscale-hub.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "otterscale-hub.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when leader election is on: explicitly, or by default with more than one replica. */}}
{{- define "otterscale-hub.leaderElection" -}}
{{- $enabled := .Values.leaderElection.enabled }}
{{- if kindIs "invalid" $enabled }}
{{- $enabled = gt (int .Values.replicaCount) 1 }}
{{- end }}
{{- if and (not $enabled) (gt (int .Values.replicaCount) 1) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: two hubs without it would both run a tunnel server and fight over every agent" }}
{{- end }}
{{- ternary "true" "false" $enabled }}
{{- end }}

{{- define "otterscale-hub.tunnelPort" -}}
{{- int .Values.config.tunnel.server.port }}
{{- end }}

{{- define "otterscale-hub.secretName" -}}
{{- default (include "otterscale-hub.fullname" .) .Values.existingSecret.name }}
{{- end }}

{{- define "otterscale-hub.secretConfigKey" -}}
{{- if .Values.existingSecret.name }}{{ .Values.existingSecret.configKey }}{{ else }}secrets.yaml{{ end }}
{{- end }}

{{/* "true" when the tunnel key is a file from the Secret (tunnel.key) rather than a seed. */}}
{{- define "otterscale-hub.tunnelKeyFile" -}}
{{- if .Values.existingSecret.name }}
{{- ternary "true" "false" .Values.existingSecret.tunnelKeyFile }}
{{- else }}
{{- ternary "true" "false" (ne .Values.secrets.tunnelKey "") }}
{{- end }}
{{- end }}

{{/* The non-secret otterscale.yaml (the ConfigMap's content). */}}
{{- define "otterscale-hub.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if not $config.keycloak.realm_url }}
{{- fail "config.keycloak.realm_url is required: the OIDC issuer URL, e.g. https://keycloak.example.com/realms/otterscale" }}
{{- end }}
{{- if not $config.clusters }}
{{- fail "config.clusters needs at least one cluster (clusters.<name>.agent: auth.user, tunnel_port, api_port)" }}
{{- end }}
{{- if eq (include "otterscale-hub.tunnelKeyFile" .) "true" }}
{{- $_ := set $config.tunnel.server "key_file" "/etc/otterscale/secret/tunnel.key" }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* "true" when the management address (/metrics, per-cluster health) listens on the Pod IP
(management.expose, or implied by serviceMonitor.enabled); empty while it stays on loopback. */}}
{{- define "otterscale-hub.managementExposed" -}}
{{- if or .Values.management.expose .Values.serviceMonitor.enabled }}true{{ end }}
{{- end }}
