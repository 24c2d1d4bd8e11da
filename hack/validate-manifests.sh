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
validate "$out/chart.yaml"
validate "$out/chart-ns.yaml"

log "kubectl kustomize config/ | kubernetes-validate --strict"
"$KUBE/kubectl" kustomize config/ >"$out/kustomize.yaml"
validate "$out/kustomize.yaml"

log "config/ in step with the chart and the CRD"
cmp -s crds/imageindex.yaml config/crd/imageindex.yaml || { log "config/crd/imageindex.yaml differs from crds/"; exit 1; }
render() { "$KUBE/helm" template imageindex charts/imageindex -n imageindex-system "$@" | grep -v 'helm.sh/chart\|^# Source'; }
render --show-only templates/rbac.yaml --show-only templates/serviceaccount.yaml | diff -u config/rbac/rbac.yaml - ||
  { log "config/rbac/rbac.yaml differs from the chart: re-render: helm template imageindex charts/imageindex -n imageindex-system --show-only templates/rbac.yaml --show-only templates/serviceaccount.yaml | grep -v "helm.sh/chart\|^# Source""; exit 1; }
render --show-only templates/deployment.yaml | diff -u config/manager/manager.yaml - ||
  { log "config/manager/manager.yaml differs from the chart: re-render: helm template imageindex charts/imageindex -n imageindex-system --show-only templates/rbac.yaml --show-only templates/serviceaccount.yaml | grep -v "helm.sh/chart\|^# Source""; exit 1; }

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
