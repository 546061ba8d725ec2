#!/usr/bin/env bash
# Installs what kvgate-gaie needs in a cluster: the Gateway API CRDs, the Gateway API Inference
# Extension CRDs, kGateway (CRDs + controller, inference extension on) and an inference Gateway
# using the kgateway GatewayClass. Every step is an apply/upgrade, so running it again is safe.
#
# Environment (defaults in brackets):
#   GATEWAY_API_VERSION [v1.4.1]   Gateway API release
#   IGW_VERSION         [v1.2.1]   Gateway API Inference Extension release
#   KGTW_VERSION        [v2.1.1]   kGateway release
#   KGTW_NAMESPACE      [kgateway-system]
#   GATEWAY_NAMESPACE   [default]  namespace of the inference Gateway
#   GATEWAY_NAME        [inference-gateway]
#   GATEWAY_CLASS       [kgateway]
#   DRY_RUN             [unset]    1: print the commands instead of running them
set -euo pipefail

GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-v1.4.1}"
IGW_VERSION="${IGW_VERSION:-${IGW_LATEST_RELEASE:-v1.2.1}}"
KGTW_VERSION="${KGTW_VERSION:-v2.1.1}"
KGTW_NAMESPACE="${KGTW_NAMESPACE:-kgateway-system}"
GATEWAY_NAMESPACE="${GATEWAY_NAMESPACE:-default}"
GATEWAY_NAME="${GATEWAY_NAME:-inference-gateway}"
GATEWAY_CLASS="${GATEWAY_CLASS:-kgateway}"

GATEWAY_API_URL="https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml"
IGW_CRDS_URL="https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/${IGW_VERSION}/manifests.yaml"
IGW_GATEWAY_URL="https://raw.githubusercontent.com/kubernetes-sigs/gateway-api-inference-extension/refs/tags/${IGW_VERSION}/config/manifests/gateway/kgateway/gateway.yaml"
KGTW_CHARTS="oci://cr.kgateway.dev/kgateway-dev/charts"

run() {
  if [[ "${DRY_RUN:-}" == "1" ]]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "error: $1 is required but not on PATH" >&2
    exit 1
  fi
}

if [[ "${DRY_RUN:-}" != "1" ]]; then
  need kubectl
  need helm
fi

echo "Gateway API CRDs ${GATEWAY_API_VERSION}"
run kubectl apply -f "${GATEWAY_API_URL}"

echo "Inference Extension CRDs ${IGW_VERSION}"
run kubectl apply -f "${IGW_CRDS_URL}"

echo "kGateway ${KGTW_VERSION} in ${KGTW_NAMESPACE}"
run helm upgrade -i --create-namespace --namespace "${KGTW_NAMESPACE}" \
  --version "${KGTW_VERSION}" kgateway-crds "${KGTW_CHARTS}/kgateway-crds"
run helm upgrade -i --namespace "${KGTW_NAMESPACE}" --version "${KGTW_VERSION}" \
  kgateway "${KGTW_CHARTS}/kgateway" --set inferenceExtension.enabled=true

echo "Gateway ${GATEWAY_NAMESPACE}/${GATEWAY_NAME} (class ${GATEWAY_CLASS})"
# Applied only when absent: re-applying would reset the class patched below for a moment.
if [[ "${DRY_RUN:-}" == "1" ]] || ! kubectl get gateway "${GATEWAY_NAME}" -n "${GATEWAY_NAMESPACE}" >/dev/null 2>&1; then
  run kubectl apply -n "${GATEWAY_NAMESPACE}" -f "${IGW_GATEWAY_URL}"
fi
# The upstream manifest names the agentgateway class; kGateway's chart creates "kgateway".
run kubectl patch gateway "${GATEWAY_NAME}" -n "${GATEWAY_NAMESPACE}" --type=json \
  -p="[{\"op\": \"replace\", \"path\": \"/spec/gatewayClassName\", \"value\": \"${GATEWAY_CLASS}\"}]"

if [[ "${DRY_RUN:-}" != "1" ]]; then
  run kubectl wait --for=condition=Programmed --timeout=180s \
    -n "${GATEWAY_NAMESPACE}" "gateway/${GATEWAY_NAME}"
  run kubectl get gateway "${GATEWAY_NAME}" -n "${GATEWAY_NAMESPACE}"
fi
