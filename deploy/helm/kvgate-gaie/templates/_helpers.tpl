{{/* Resource names derive from model.shortName so that several models can share a namespace. */}}
{{- define "kvgate-gaie.pool" -}}{{ .Values.model.shortName }}-pool{{- end -}}
{{- define "kvgate-gaie.epp" -}}{{ .Values.model.shortName }}-epp{{- end -}}
{{- define "kvgate-gaie.route" -}}{{ .Values.model.shortName }}-route{{- end -}}
{{- define "kvgate-gaie.objective" -}}{{ .Values.model.shortName }}-model{{- end -}}
{{- define "kvgate-gaie.bodyTransformer" -}}{{ .Values.model.shortName }}-body-transformer{{- end -}}
{{- define "kvgate-gaie.gatewayNamespace" -}}{{ .Values.httpRoute.gatewayNamespace | default .Release.Namespace }}{{- end -}}

{{- define "kvgate-gaie.labels" -}}
app.kubernetes.io/part-of: kvgate-gaie
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kvgate-gaie.eppSelector" -}}
app.kubernetes.io/name: {{ include "kvgate-gaie.epp" . }}
{{- end -}}

{{- define "kvgate-gaie.bodyTransformerSelector" -}}
app.kubernetes.io/name: {{ include "kvgate-gaie.bodyTransformer" . }}
{{- end -}}

{{/* The pool's target ports: inferencePool.targetPorts, else the single inferencePool.port. */}}
{{- define "kvgate-gaie.targetPorts" -}}
{{- if .Values.inferencePool.targetPorts -}}
{{- toJson .Values.inferencePool.targetPorts -}}
{{- else -}}
{{- toJson (list .Values.inferencePool.port) -}}
{{- end -}}
{{- end -}}

{{/* KV routing needs the block size: it is on unless epp.useDynamo or dynamo.useKvRouting is off. */}}
{{- define "kvgate-gaie.kvRouting" -}}
{{- if and .Values.epp.useDynamo .Values.dynamo.useKvRouting -}}true{{- end -}}
{{- end -}}

{{/* What the picker's image runs: "kvgate", or "gaie" (the upstream endpoint picker: its flags,
its plugins). extension.flavor, else: kvgate with epp.useDynamo; without it, gaie when
extension.image names an image (the seed's `--set epp.useDynamo=false --set-string
extension.image=$EPP_IMAGE`), else kvgate's own image doing the standard round-robin. */}}
{{- define "kvgate-gaie.flavor" -}}
{{- if .Values.extension.flavor -}}{{ .Values.extension.flavor }}
{{- else if .Values.epp.useDynamo -}}kvgate
{{- else if .Values.extension.image -}}gaie
{{- else -}}kvgate
{{- end -}}
{{- end -}}

{{/* The picker's image: extension.image, else the flavor's default. */}}
{{- define "kvgate-gaie.image" -}}
{{- if .Values.extension.image -}}{{ .Values.extension.image }}
{{- else if eq (include "kvgate-gaie.flavor" .) "gaie" -}}{{ .Values.extension.standardImage }}
{{- else -}}{{ .Values.extension.kvgateImage }}
{{- end -}}
{{- end -}}

{{/* The body transformer is kvgate's: the picker's image when that is kvgate, else kvgateImage. */}}
{{- define "kvgate-gaie.kvgateImage" -}}
{{- if and .Values.extension.image (eq (include "kvgate-gaie.flavor" .) "kvgate") -}}{{ .Values.extension.image }}
{{- else -}}{{ .Values.extension.kvgateImage }}
{{- end -}}
{{- end -}}

{{- define "kvgate-gaie.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The EndpointPickerConfig text: epp.config, else epp.configFile, else the variant's default:
KV routing (epp.useDynamo), else the standard picker's round-robin (kvgate) or random (gaie). */}}
{{- define "kvgate-gaie.eppConfig" -}}
{{- if .Values.epp.config -}}
{{- .Values.epp.config -}}
{{- else if .Values.epp.configFile -}}
{{- .Files.Get (printf "files/config/%s" .Values.epp.configFile) -}}
{{- else if and .Values.epp.useDynamo (eq .Values.epp.routing "dynamo") -}}
{{- .Files.Get "files/config/epp-config-dynamo.yaml" -}}
{{- else if .Values.epp.useDynamo -}}
{{- .Files.Get "files/config/epp-config-kvgate.yaml" -}}
{{- else if eq (include "kvgate-gaie.flavor" .) "kvgate" -}}
{{- .Files.Get "files/config/epp-config-round-robin.yaml" -}}
{{- else -}}
{{- /* The upstream picker has no round-robin picker; random is the nearest it has. */ -}}
{{- .Files.Get "files/config/epp-config-random.yaml" -}}
{{- end -}}
{{- end -}}
