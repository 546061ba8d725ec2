{{/*
Fail-fast checks, run by every template that includes "kvgate-gaie.validate": a release that
renders is one whose picker can route. Messages name the value to set.
*/}}
{{- define "kvgate-gaie.validate" -}}
{{- $_ := required "model.identifier is required: the model name clients send (e.g. Qwen/Qwen3-0.6B)" .Values.model.identifier -}}
{{- $_ := required "model.shortName is required: a DNS-safe name for resources (e.g. qwen)" .Values.model.shortName -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$" .Values.model.shortName) -}}
{{- fail (printf "model.shortName %q must be lowercase letters, digits and '-', at most 40 characters" .Values.model.shortName) -}}
{{- end -}}
{{- if not .Values.inferencePool.selector.matchLabels -}}
{{- fail "inferencePool.selector.matchLabels is required: the labels of the model server pods" -}}
{{- end -}}
{{- $ports := include "kvgate-gaie.targetPorts" . | fromJsonArray -}}
{{- if gt (len $ports) 8 -}}
{{- fail "inferencePool.targetPorts takes at most 8 ports" -}}
{{- end -}}
{{- if not (has .Values.inferencePool.failureMode (list "FailOpen" "FailClose")) -}}
{{- fail (printf "inferencePool.failureMode must be FailOpen or FailClose, got %v" .Values.inferencePool.failureMode) -}}
{{- end -}}
{{- if include "kvgate-gaie.kvRouting" . -}}
{{- $bs := required "dynamo.kvBlockSize is required when KV routing is on (epp.useDynamo and dynamo.useKvRouting): set it to the engines' --block-size, e.g. 16" .Values.dynamo.kvBlockSize -}}
{{- if not (has (int $bs) (list 16 32 64 128 256 512 1024 2048 4096 8192)) -}}
{{- fail (printf "dynamo.kvBlockSize must be a power of two in [16, 8192], got %v" $bs) -}}
{{- end -}}
{{- end -}}
{{- if .Values.dynamoBackend.enabled -}}
{{- if not .Values.epp.useDynamo -}}
{{- fail "dynamoBackend.enabled needs epp.useDynamo: only kvgate discovers Dynamo workers behind the frontend pods" -}}
{{- end -}}
{{- if and (eq .Values.inferencePool.failureMode "FailOpen") (eq .Values.dynamoBackend.frontendRouterMode "direct") -}}
{{- fail "inferencePool.failureMode FailOpen with dynamoBackend.frontendRouterMode direct: requests passing without the picker carry no worker id and a direct-mode frontend refuses them (400); run the frontends with --router-mode kv (or round-robin), or set FailClose" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.epp.useDynamo (eq .Values.extension.flavor "gaie") -}}
{{- fail "extension.flavor gaie with epp.useDynamo: KV-aware routing is kvgate's; set epp.useDynamo=false to run the upstream endpoint picker" -}}
{{- end -}}
{{- if and .Values.dynamo.replicaSync.enabled (not .Values.dynamo.replicaSync.natsUrl) -}}
{{- fail "dynamo.replicaSync.natsUrl is required when dynamo.replicaSync.enabled (e.g. nats://nats:4222)" -}}
{{- end -}}
{{- if and .Values.bodyTransformer.enabled (not (has .Values.bodyTransformer.mode (list "extProc" "istioLua" "envoyGatewayLua"))) -}}
{{- fail (printf "bodyTransformer.mode must be extProc, istioLua or envoyGatewayLua, got %v" .Values.bodyTransformer.mode) -}}
{{- end -}}
{{- if and .Values.epp.configFile (not .Values.epp.config) (not (.Files.Get (printf "files/config/%s" .Values.epp.configFile))) -}}
{{- fail (printf "epp.configFile %q is not in deploy/config; set epp.config to inline text instead" .Values.epp.configFile) -}}
{{- end -}}
{{- if not (include "kvgate-gaie.eppConfig" . | trim) -}}
{{- fail "the EndpointPickerConfig is empty: files/config (a link to deploy/config) is missing from this copy of the chart; set epp.config to the config text" -}}
{{- end -}}
{{- end -}}
