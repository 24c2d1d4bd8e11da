#!/usr/bin/env bash
# Offline checks of everything a user applies: the Helm chart (lint, render, schema-validate),
# the kustomize tree (render, schema-validate, in step with the chart), and the samples against
# the CRD's own schema. helm and kubectl come from hack/kube-build.sh; the validators from PyPI.
source "$(dirname "$0")/lib.sh"
KUBE=$CACHE/kube/bin
[[ -x $KUBE/helm && -x $KUBE/kubectl ]] || "$ROOT/hack/kube-build.sh"
"$VENV/bin/pip" show -q kubernetes-validate check-jsonschema >/dev/null 2>&1 ||
  "$VENV/bin/pip" install -q kubernetes-validate==1.37.0 check-jsonschema==0.39.0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$ROOT"

validate() { # FILE: every object against the Kubernetes schemas, oldest and newest supported
  for v in 1.33.0 1.37.0; do
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$1"
  done
}

log "helm lint"
"$KUBE/helm" lint --strict charts/imageindex >/dev/null
log "helm template (cluster-wide and one-namespace) | kubernetes-validate --strict"
"$KUBE/helm" template imageindex charts/imageindex -n imageindex-system --include-crds >"$out/chart.yaml"
"$KUBE/helm" template imageindex charts/imageindex -n imageindex-system --set watchNamespace=shop >"$out/chart-ns.yaml"
# Every optional object on (but the ServiceMonitor, whose CRD these schemas lack), and a second
# release beside the first: no object of one may have the other's name.
"$KUBE/helm" template other charts/imageindex -n imageindex-system --set networkPolicy.enabled=true \
  --set 'networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring' \
  --set serviceAccount.annotations.example=yes >"$out/chart-other.yaml"
"$KUBE/helm" lint --strict charts/imageindex --set metrics.serviceMonitor.enabled=true >/dev/null
validate "$out/chart.yaml"
validate "$out/chart-ns.yaml"
validate "$out/chart-other.yaml"
"$PY" - "$out/chart.yaml" "$out/chart-other.yaml" <<'PYEOF'
import sys, yaml
def names(f):
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for o in yaml.safe_load_all(open(f)) if o and o["kind"] != "CustomResourceDefinition"}
both = names(sys.argv[1]) & names(sys.argv[2])
sys.exit(f"two releases collide on {sorted(both)}" if both else 0)
PYEOF
# A misspelt value is refused (values.schema.json), not ignored.
if "$KUBE/helm" template imageindex charts/imageindex --set replica=2 >/dev/null 2>&1; then
  log "values.schema.json let a misspelt value (replica) through"; exit 1
fi

log "kubectl kustomize config/ | kubernetes-validate --strict"
"$KUBE/kubectl" kustomize config/ >"$out/kustomize.yaml"
validate "$out/kustomize.yaml"

log "config/ in step with the chart and the CRD"
cmp -s crds/imageindex.yaml config/crd/imageindex.yaml || { log "config/crd/imageindex.yaml differs from crds/"; exit 1; }
render() { "$KUBE/helm" template imageindex charts/imageindex -n imageindex-system "$@" | grep -v 'helm.sh/chart\|managed-by: Helm\|^# Source'; }
render --show-only templates/rbac.yaml --show-only templates/serviceaccount.yaml | diff -u config/rbac/rbac.yaml - ||
  { log "config/rbac/rbac.yaml differs from the chart: re-render: helm template imageindex charts/imageindex -n imageindex-system --show-only templates/rbac.yaml --show-only templates/serviceaccount.yaml | grep -v \"helm.sh/chart\|managed-by: Helm\|^# Source\""; exit 1; }
render --show-only templates/deployment.yaml --show-only templates/metrics.yaml | diff -u config/manager/manager.yaml - ||
  { log "config/manager/manager.yaml differs from the chart: re-render: helm template imageindex charts/imageindex -n imageindex-system --show-only templates/deployment.yaml --show-only templates/metrics.yaml | grep -v \"helm.sh/chart\|managed-by: Helm\|^# Source\""; exit 1; }

log "samples against the CRD's schema (check-jsonschema)"
"$PY" - crds/imageindex.yaml "$out/imageindex.schema.json" <<'PYEOF'
import json, sys, yaml
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
def fix(s):  # OpenAPI's `nullable` is JSON Schema's type union
    if isinstance(s, dict):
        if s.pop("nullable", False) and "type" in s:
            s["type"] = [s["type"], "null"]
        s.pop("x-kubernetes-int-or-string", None) and s.update({"type": ["integer", "string"]})
        for v in s.values():
            fix(v)
    elif isinstance(s, list):
        for v in s:
            fix(v)
fix(schema)
json.dump(schema, open(sys.argv[2], "w"))
PYEOF
"$VENV/bin/check-jsonschema" --schemafile "$out/imageindex.schema.json" config/samples/imageindex.yaml
log "manifests: ok"
