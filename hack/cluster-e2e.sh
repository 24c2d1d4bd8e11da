#!/usr/bin/env bash
# The operator as a cluster runs it (issue 13), on hack/cluster.sh's real single-node Kubernetes.
# Each step fails loudly; `kubectl get imgidx,jobs,pods,deploy -A -o wide`, the events and the
# controller's log after each one are saved under .state/artifacts/cluster/.
#   1. `helm install` of charts/imageindex as it is; the controller pod becomes Ready and leads.
#   2. An ImageIndex over N photos in the local S3 server (Milvus by address, MySQL and S3
#      Secrets): the Jobs run as pods, `kubectl wait --for=condition=Ready` returns, every photo
#      is indexed (in status and on the chart's metrics Service), and a search through the
#      search Service's ClusterIP (kube-proxy) returns the photo a near-duplicate query was made
#      from as the top hit. A rotated catalog Secret reaches the running search pod (no restart).
#   3. 20 objects added and 10 deleted: the next Job embeds the 20 and deletes the 10, from
#      Milvus and the catalog.
#   5. A search-only edit starts no embedding Job (nor does handing the search replica count to an
#      autoscaler, which the operator then leaves alone); a batch-size edit does.
#   4. `helm upgrade` to a new image tag with 1, then 2 replicas: the rollout completes, the
#      Lease moves to a new pod, and work that arrived during the upgrade is done.
#   8. The leader killed while an embedding Job runs: the standby leads, the index converges.
#   9. The model changes (ResNet50 to ResNet18, another width) while a client searches through the
#      Service: every search answers with results, from the old model until the swap and the new
#      one after, moving once; the old generation is dropped after its grace period.
#   6. Deletion with `Delete` (collection and rows gone) and `Retain` (kept), owned objects
#      garbage-collected; a namespace deleted with an ImageIndex in it, its Milvus credentials
#      Secret going first, terminates.
source "$(dirname "$0")/lib.sh"
N=${N:-200}
"$ROOT/hack/cluster.sh" up
source "$STATE/env"
source "$STATE/cluster.env"
ART=$STATE/artifacts/cluster
rm -rf "$ART" && mkdir -p "$ART"

k() { "$KUBECTL" --kubeconfig "$CLUSTER_KUBECONFIG" "$@"; }
snapshot() {
  k get imgidx,jobs,pods,deploy -A -o wide >"$ART/$1.txt" 2>&1 || true
  k get events -A --sort-by=.lastTimestamp >"$ART/$1.events.txt" 2>&1 || true
  local pod
  for pod in $(controllers); do
    k -n imageindex-system logs "$pod" --tail 300 >"$ART/$1.$pod.log" 2>&1 || true
  done
}
fail() {
  log "cluster e2e FAILED: $*"
  snapshot failed
  cat "$ART/failed.txt" >&2
  tail -15 "$ART/failed.events.txt" >&2
  tail -30 "$ART/failed.$(holder).log" >&2 || true
  exit 1
}

# The Lease's holder, and whether it is one of the controller pods a rollout keeps.
holder() { k -n imageindex-system get lease imageindex-controller -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
controllers() { # the controller pods that run the Deployment's image and are not terminating
  local image
  image=$(k -n imageindex-system get deploy imageindex-controller -o jsonpath='{.spec.template.spec.containers[0].image}')
  k -n imageindex-system get pods -l app.kubernetes.io/component=controller -o \
    jsonpath='{range .items[*]}{.metadata.name} {.spec.containers[0].image} {.metadata.deletionTimestamp}{"\n"}{end}' |
    awk -v image="$image" 'NF == 2 && $2 == image {print $1}' | tr '\n' ' '
}
current_leader() { # [NOT]: a current pod leads (and it is not NOT)
  local h
  h=$(holder)
  [[ -n $h && $h != "${1:-}" && " $(controllers) " == *" $h "* ]]
}
condition() { k -n "$1" get imgidx "$2" -o jsonpath="{.status.conditions[?(@.type==\"$3\")].status}"; }
status_of() { k -n "$1" get imgidx "$2" -o jsonpath="{$3}"; }
jobs_of() { k -n "$1" get jobs -l "app.kubernetes.io/instance=$2,app.kubernetes.io/component=$3" -o name | wc -l; }
more_jobs() { (($(jobs_of "$1" "$2" "$3") > $4)); } # NS NAME KIND COUNT
newest_job() {
  k -n "$1" get jobs -l "app.kubernetes.io/instance=$2,app.kubernetes.io/component=$3" \
    --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1:].metadata.name}'
}
summary() { # NS JOB FIELD: a field of the JSON summary the Job's pod printed last
  k -n "$1" logs "job/$2" |
    "$PY" -c 'import json,sys; t="\n"+sys.stdin.read(); print(json.loads(t[t.rindex("\n{"):])[sys.argv[1]])' "$3"
}
answered() { [[ $(status_of "$1" "$2" .status.lastHandledResync)/$(condition "$1" "$2" Ready) == "$3/True" ]]; }
# Asks for a resync now and waits until it was answered and the index is Ready again.
resync() { # NS NAME
  local token=r$RANDOM$SECONDS
  k -n "$1" annotate imgidx "$2" --overwrite "imageindex.dev/resync=$token" >/dev/null
  wait_for "resync $token of $1/$2" 300 answered "$1" "$2" "$token"
}
all_indexed() { [[ $(status_of "$1" "$2" .status.images.indexed)/$(condition "$1" "$2" Ready) == "$in_bucket/True" ]]; }
catalog_rows() { # COLLECTION [KEY LIKE]
  mysql -h 127.0.0.1 -P "$MYSQL_PORT" -u "$MYSQL_USER" -p"$MYSQL_PASSWORD" "$MYSQL_DB" -N -e \
    "SELECT COUNT(*) FROM images WHERE collection = '$1' AND object_key LIKE '${2:-%}'"
}
milvus_has() {
  curl -fsS --max-time 10 "http://127.0.0.1:$MILVUS_PORT/v1/vector/collections" |
    "$PY" -c 'import json,sys; sys.exit(0 if sys.argv[1] in json.load(sys.stdin)["data"] else 1)' "$1"
}
owned() { k -n "$1" get deploy,svc,jobs -l "app.kubernetes.io/instance=$2" -o name; }
none_owned() { [[ -z $(owned "$1" "$2") ]]; }
top_hit() { # QUERY FILE
  curl -fsS --max-time 30 -F image=@"$1" -F topk=1 "http://$ip:$port/img/search" |
    "$PY" -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["key"])'
}

log "cluster e2e 1: helm install, the controller becomes Ready"
# Helm installs crds/ on a first install only; on a cluster kept from an earlier run this is
# the upgrade step the README asks of users.
if k get crd imageindexes.imageindex.dev >/dev/null 2>&1; then
  k apply --server-side --force-conflicts -f "$ROOT/charts/imageindex/crds/" >/dev/null || fail "CRD upgrade"
fi
"$HELM" --kubeconfig "$CLUSTER_KUBECONFIG" upgrade --install imageindex "$ROOT/charts/imageindex" \
  -n imageindex-system --create-namespace --set replicas=1 --set watchNamespace= \
  --set image.repository="${CLUSTER_IMAGE%:*}" --set image.tag="${CLUSTER_IMAGE##*:}" --wait --timeout 180s >/dev/null ||
  fail "helm install"
k -n imageindex-system rollout status deploy/imageindex-controller --timeout 120s >/dev/null || fail "controller rollout"
wait_for "a controller pod to lead" 60 current_leader || fail "no controller pod took the lease (holder $(holder))"
log "leader: $(holder)"
# What an earlier run left (its ImageIndexes' finalizers need the cluster-wide controller).
k delete namespace e2e --ignore-not-found --wait --timeout 300s >/dev/null ||
  fail "namespace e2e from an earlier run did not go"
k delete namespace -l imageindex.dev/e2e=cluster --wait --timeout 300s >/dev/null ||
  fail "the team namespaces from an earlier run did not go"
snapshot 1-install

log "cluster e2e 2: an ImageIndex over $N photos, embedded by Jobs, searched through its Service"
photos=$CACHE/photos/parity-1000
all=("$photos"/photos/*.jpg)
bucket=cluster-e2e-$RANDOM
s3() { curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" "$@"; }
in_bucket=0
upload() { # FROM COUNT: photos [FROM, FROM+COUNT) of the parity set
  local f
  for f in "${all[@]:$1:$2}"; do
    s3 -T "$f" "$IMAGEINDEX_S3_ENDPOINT/$bucket/e2e/${f##*/}" >/dev/null || fail "upload ${f##*/}"
  done
  in_bucket=$((in_bucket + $2))
}
s3 -X PUT "$IMAGEINDEX_S3_ENDPOINT/$bucket" >/dev/null || fail "create bucket $bucket"
upload 0 "$N"
next=$N
k create namespace e2e >/dev/null
gw=$CLUSTER_GATEWAY
k -n e2e create secret generic catalog \
  --from-literal=url="mysql://$MYSQL_USER:$MYSQL_PASSWORD@$gw:$MYSQL_PORT/$MYSQL_DB" >/dev/null
k -n e2e create secret generic s3-keys --from-literal=AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" --from-literal=AWS_REGION=us-east-1 >/dev/null
# Milvus here has no authentication; the Secret is what a namespace teardown deletes first (6).
k -n e2e create secret generic milvus-auth --from-literal=url=root:Milvus >/dev/null
# The account the index's pods run as (where a cloud identity would be bound).
k -n e2e create serviceaccount bucket-reader >/dev/null
index() { # NS NAME COLLECTION POLICY
  k apply -f - >/dev/null <<EOF
apiVersion: imageindex.dev/v1alpha1
kind: ImageIndex
metadata: {name: $2, namespace: $1}
spec:
  source: {url: "s3://$bucket/e2e/", endpoint: "http://$gw:$S3_PORT", credentialsSecret: s3-keys}
  milvus: {address: "http://$gw:$MILVUS_PORT", collection: "$3", credentialsSecretRef: {name: milvus-auth}}
  mysql: {secretRef: {name: catalog}}
  embedding: {parallelism: 1, batchSize: 16, resources: {requests: {cpu: 500m, memory: 512Mi}}}
  search: {replicas: 1, resources: {requests: {cpu: 100m, memory: 256Mi}}}
  deletionPolicy: $4
  serviceAccountName: bucket-reader
EOF
}
collection=${bucket//-/_}
index e2e photos "$collection" Delete
k -n e2e wait imgidx/photos --for=condition=Ready --timeout=900s >/dev/null || fail "ImageIndex not Ready"
snapshot 2-ready
indexed=$(status_of e2e photos .status.images.indexed)
[[ $indexed == "$N" ]] || fail "indexed $indexed of $N"
[[ $(catalog_rows "$collection") == "$N" ]] || fail "catalog rows"
(($(jobs_of e2e photos embed) > 0)) || fail "no embedding Job ran"
accounts=$(k -n e2e get pods -l app.kubernetes.io/instance=photos -o jsonpath='{.items[*].spec.serviceAccountName}' |
  tr ' ' '\n' | sort -u | tr '\n' ' ')
[[ $accounts == "bucket-reader " ]] || fail "the index's pods run as: $accounts"
ip=$(k -n e2e get svc photos-search -o jsonpath='{.spec.clusterIP}')
port=$(k -n e2e get svc photos-search -o jsonpath='{.spec.ports[0].port}')
query=00000.jpg
top=$(top_hit "$photos/queries/$query") || fail "search through $ip:$port"
[[ $top == "$query" ]] || fail "top hit $top for the near-duplicate of $query"
log "search through the Service $ip:$port (kube-proxy): top hit $top"
# The chart's metrics Service: the controller's figures per ImageIndex.
mip=$(k -n imageindex-system get svc imageindex-controller-metrics -o jsonpath='{.spec.clusterIP}')
indexed_metric=$(curl -fsS --max-time 10 "http://$mip:8081/metrics" |
  awk '$1 == "imageindex_controller_images{namespace=\"e2e\",name=\"photos\",state=\"indexed\"}" {print $2}')
[[ $indexed_metric == "$N" ]] || fail "metrics Service $mip:8081: indexed $indexed_metric, want $N"
# A rotated Secret reaches the running search pod through its mounted files (the kubelet rewrites
# them; env would keep the old value): it connects with the new value, no restart, no rollout.
spod=$(k -n e2e get pods -l app.kubernetes.io/instance=photos,app.kubernetes.io/component=search \
  -o jsonpath='{.items[0].metadata.name}')
spod_ip=$(k -n e2e get pod "$spod" -o jsonpath='{.status.podIP}')
k -n e2e create secret generic catalog --dry-run=client -o yaml \
  --from-literal=url="mysql://$MYSQL_USER:$MYSQL_PASSWORD@$gw:$MYSQL_PORT/$MYSQL_DB?ssl-mode=disabled" |
  k apply -f - >/dev/null
rotated() {
  curl -fsS --max-time 5 "http://$spod_ip:8080/metrics" |
    grep -q '^imageindex_credential_reloads_total{result="applied"} 1$'
}
wait_for "the search pod to use the rotated catalog Secret" 240 rotated || fail "rotation not applied by $spod"
restarts=$(k -n e2e get pod "$spod" -o jsonpath='{.status.containerStatuses[0].restartCount}')
[[ $restarts == 0 ]] || fail "$spod restarted $restarts times"
top=$(top_hit "$photos/queries/$query") || fail "search after the rotation"
[[ $top == "$query" ]] || fail "top hit $top after the rotation"
log "search pod $spod: the rotated catalog Secret is in use, no restart"

log "cluster e2e 3: add 20 objects, delete 10; the next Job embeds only the 20, the 10 leave"
embeds=$(jobs_of e2e photos embed)
upload "$next" 20 && next=$((next + 20))
gone=("${all[@]:N-10:10}")
for f in "${gone[@]}"; do
  s3 -X DELETE "$IMAGEINDEX_S3_ENDPOINT/$bucket/e2e/${f##*/}" >/dev/null || fail "delete ${f##*/}"
done
in_bucket=$((in_bucket - 10))
resync e2e photos || fail "the resync after 20 new and 10 deleted objects"
snapshot 3-changed
more_jobs e2e photos embed "$embeds" || fail "no embedding Job for the changes"
job=$(newest_job e2e photos embed)
for want in new=20 deleted=10 changed=0 vectors=$in_bucket; do
  got=$(summary e2e "$job" "${want%=*}")
  [[ $got == "${want#*=}" ]] || fail "Job $job: ${want%=*} $got, want ${want#*=}"
done
[[ $(status_of e2e photos .status.images.indexed) == "$in_bucket" ]] || fail "status.images.indexed"
[[ $(catalog_rows "$collection") == "$in_bucket" ]] || fail "catalog rows"
for f in "${gone[@]}"; do
  [[ $(catalog_rows "$collection" "%/${f##*/}") == 0 ]] || fail "${f##*/} is still in the catalog"
done
top=$(top_hit "$photos/queries/${gone[0]##*/}") || fail "search"
[[ $top != "${gone[0]##*/}" ]] || fail "deleted ${gone[0]##*/} is still found"
log "Job $job embedded 20 and deleted 10; catalog and Milvus hold $in_bucket"

log "cluster e2e 5: a search-only edit starts no embedding Job; an embedding edit does"
embeds=$(jobs_of e2e photos embed)
k -n e2e patch imgidx photos --type merge -p '{"spec":{"search":{"replicas":2}}}' >/dev/null
two_search() { [[ $(k -n e2e get deploy photos-search -o jsonpath='{.status.availableReplicas}') == 2 ]]; }
wait_for "2 search replicas" 180 two_search || fail "search did not scale to 2"
resync e2e photos || fail "the resync after the search edit"
[[ $(jobs_of e2e photos embed) == "$embeds" ]] || fail "a search-only edit started an embedding Job"
# Autoscaled: an HPA (here kubectl scale) sets the count, and the operator leaves it.
k -n e2e patch imgidx photos --type merge -p '{"spec":{"search":{"autoscaled":true}}}' >/dev/null
k -n e2e scale deploy photos-search --replicas=1 >/dev/null
resync e2e photos || fail "the resync after autoscaled: true"
[[ $(k -n e2e get deploy photos-search -o jsonpath='{.spec.replicas}') == 1 ]] ||
  fail "the operator took the search replica count back from the autoscaler"
[[ $(jobs_of e2e photos embed) == "$embeds" ]] || fail "autoscaled: true started an embedding Job"
k -n e2e patch imgidx photos --type merge \
  -p '{"spec":{"search":{"replicas":1,"autoscaled":false},"embedding":{"batchSize":8}}}' >/dev/null
wait_for "an embedding Job for the batch-size edit" 120 more_jobs e2e photos embed "$embeds" ||
  fail "a batch-size edit started no embedding Job"
k -n e2e wait imgidx/photos --for=condition=Ready --timeout=300s >/dev/null || fail "not Ready after the batch-size edit"
snapshot 5-edits

log "cluster e2e 4: helm upgrade to a new image tag, with 1 and with 2 replicas; leadership moves, nothing is lost"
for replicas in 1 2; do
  tag=${CLUSTER_IMAGE##*:}-upgrade$replicas
  ctr --address "$CLUSTER_CONTAINERD" -n k8s.io images tag --force "$CLUSTER_IMAGE" "${CLUSTER_IMAGE%:*}:$tag" >/dev/null
  before=$(holder)
  # Work that arrives as the upgrade starts: the new leader must do it.
  upload "$next" 5 && next=$((next + 5))
  k -n e2e annotate imgidx photos --overwrite "imageindex.dev/resync=upgrade-$replicas" >/dev/null
  started=$SECONDS
  "$HELM" --kubeconfig "$CLUSTER_KUBECONFIG" upgrade imageindex "$ROOT/charts/imageindex" -n imageindex-system \
    --reuse-values --set image.tag="$tag" --set replicas="$replicas" --wait --timeout 180s >/dev/null ||
    fail "helm upgrade to $tag with $replicas replicas"
  k -n imageindex-system rollout status deploy/imageindex-controller --timeout 120s >/dev/null ||
    fail "the rollout to $tag"
  rolled=$((SECONDS - started))
  wait_for "leadership to move from $before" 60 current_leader "$before" ||
    fail "leadership did not move from $before (holder $(holder), pods $(controllers))"
  moved=$((SECONDS - started))
  ready=$(k -n imageindex-system get deploy imageindex-controller -o jsonpath='{.status.readyReplicas}')
  [[ $ready == "$replicas" ]] || fail "$ready of $replicas controller replicas Ready"
  wait_for "the work that arrived during the upgrade" 300 all_indexed e2e photos ||
    fail "indexed $(status_of e2e photos .status.images.indexed) of $in_bucket after the upgrade to $tag"
  wait_for "resync upgrade-$replicas" 120 answered e2e photos "upgrade-$replicas" || fail "resync upgrade-$replicas lost"
  log "upgrade to $tag, $replicas replicas: rolled out in ${rolled}s; leader $before -> $(holder) by ${moved}s; $in_bucket indexed"
  snapshot "4-upgrade-$replicas"
done

log "cluster e2e 8: the leader killed while an embedding Job runs; the standby picks up"
upload "$next" 40 && next=$((next + 40))
embeds=$(jobs_of e2e photos embed)
k -n e2e annotate imgidx photos --overwrite imageindex.dev/resync=kill >/dev/null
wait_for "an embedding Job for 40 new objects" 120 more_jobs e2e photos embed "$embeds" ||
  fail "no embedding Job for 40 new objects"
killed=$(holder)
k -n imageindex-system delete pod "$killed" --grace-period=0 --force >/dev/null 2>&1 || fail "kill $killed"
wait_for "the index to converge" 300 all_indexed e2e photos || fail "the index did not converge after $killed was killed"
wait_for "another leader" 60 current_leader "$killed" || fail "no pod leads after $killed (holder $(holder))"
log "killed $killed mid-Job; $(holder) leads; $in_bucket indexed"
snapshot 8-killed

log "cluster e2e 9: the model changes under live search; the alias moves once; the old generation goes"
# A client searches through the Service, one query after another, while the index is rebuilt for
# ResNet18 (512-d vectors) beside the ResNet50 generation, until told to stop (at most 15 min).
answers=$ART/9-answers.txt
: >"$answers"
(
  end=$((SECONDS + 900))
  while [[ ! -e $ART/9-stop && $SECONDS -lt $end ]]; do
    printf '%s\n' "$(curl -sS --max-time 30 -F image=@"$photos/queries/$query" -F topk=3 \
      -w '\t%{http_code}' "http://$ip:$port/img/search" 2>&1 | tr -d '\n')" >>"$answers"
  done
) &
searcher=$!
k -n e2e patch imgidx photos --type merge \
  -p '{"spec":{"embedding":{"modelUri":"/models/resnet18.onnx"},"generations":{"graceSeconds":20}}}' >/dev/null
serving_g1() { [[ $(status_of e2e photos .status.generations.serving.number) == 1 ]]; }
wait_for "search to move to generation 1" 900 serving_g1 || fail "the index did not move to ResNet18"
k -n e2e wait imgidx/photos --for=condition=Ready --timeout=300s >/dev/null || fail "not Ready after the model change"
snapshot 9-swapped
rebuilt=$(k -n e2e get imgidx photos -o jsonpath='{.status.conditions[?(@.type=="Rebuilding")].reason}')
[[ $rebuilt == Swapped || $rebuilt == Serving ]] || fail "the Rebuilding condition says $rebuilt"
[[ $(status_of e2e photos .status.generations.serving.model) == resnet18.onnx@fp32 ]] || fail "status: serving model"
sleep 15 # searches answered by the new generation, through pods that moved to it
touch "$ART/9-stop"
wait "$searcher"
rm -f "$ART/9-stop"
verdict=$("$PY" - "$answers" <<'PY'
import json, sys
rows = [l.rstrip("\n").rsplit("\t", 1) for l in open(sys.argv[1]) if l.strip()]
bad = [r for r in rows if len(r) != 2 or r[1] != "200" or not json.loads(r[0]).get("results")]
if bad:
    sys.exit(f"{len(bad)} of {len(rows)} searches failed, e.g. {bad[0]}")
models = [json.loads(body)["model"] for body, _ in rows]
moves = sum(a != b for a, b in zip(models, models[1:]))
if moves != 1 or not models[0].startswith("resnet50") or not models[-1].startswith("resnet18"):
    sys.exit(f"search moved {moves} times, from {models[0]} to {models[-1]}")
print(f"{len(rows)} searches, every one 200 with results: {models.index(models[-1])} by {models[0]}, "
      f"{len(rows) - models.index(models[-1])} by {models[-1]}")
PY
) || fail "search during the model change: $verdict"
log "model change: $verdict"
old_generation=${collection}_g0
milvus_has "$old_generation" || fail "generation 0 ($old_generation) was dropped before its grace period"
sleep 20
resync e2e photos || fail "the resync after the grace period"
milvus_has "$old_generation" && fail "generation 0 ($old_generation) outlived its grace period"
collection=${collection}_g1 # where the index is now (its name is the alias)
[[ $(catalog_rows "$collection") == "$in_bucket" ]] || fail "generation 1 holds $(catalog_rows "$collection") rows"
log "generation 0 dropped after its grace; generation 1 ($collection) holds $in_bucket"

log "cluster e2e 6: deletion (Delete and Retain), and a whole namespace"
milvus_has "$collection" || fail "the collection $collection is not in Milvus"
retained=${collection}_kept
index e2e kept "$retained" Retain
k -n e2e wait imgidx/kept --for=condition=Ready --timeout=600s >/dev/null || fail "kept not Ready"
k -n e2e delete imgidx photos --timeout 180s >/dev/null || fail "the Delete ImageIndex did not go"
wait_for "photos' owned objects to go" 120 none_owned e2e photos || fail "left behind: $(owned e2e photos)"
milvus_has "$collection" && fail "Delete kept the collection $collection"
[[ $(catalog_rows "$collection") == 0 ]] || fail "Delete kept $(catalog_rows "$collection") catalog rows"
k -n e2e delete imgidx kept --timeout 180s >/dev/null || fail "the Retain ImageIndex did not go"
wait_for "kept's owned objects to go" 120 none_owned e2e kept || fail "left behind: $(owned e2e kept)"
milvus_has "$retained" || fail "Retain dropped the collection $retained"
[[ $(catalog_rows "$retained") == "$in_bucket" ]] || fail "Retain kept $(catalog_rows "$retained") catalog rows"
log "Delete dropped $collection and its rows; Retain kept $retained and its $in_bucket rows"
leader_ip=$(k -n imageindex-system get pod "$(holder)" -o jsonpath='{.status.podIP}')
curl -fsS --max-time 10 "http://$leader_ip:8081/metrics" | grep -q 'name="photos"' &&
  fail "the leader still exports metrics of the deleted e2e/photos"
snapshot 6-deleted
index e2e torn "${collection}_torn" Delete
k -n e2e wait imgidx/torn --for=condition=Ready --timeout=600s >/dev/null || fail "torn not Ready"
k -n e2e delete secret milvus-auth >/dev/null
started=$SECONDS
k delete namespace e2e --timeout 300s >/dev/null || fail "namespace e2e still Terminating after 300 s"
# Its cleanup Job cannot start in a terminating namespace: the data is kept, with a Warning.
milvus_has "${collection}_torn" || fail "the torn-down namespace's collection was dropped without its cleanup Job"
log "namespace e2e with an ImageIndex in it (its Milvus Secret deleted first) terminated in $((SECONDS - started))s"
snapshot 6-namespace

log "cluster e2e 7: one cluster-wide install serves two namespaces on one Milvus and one MySQL; then single-namespace mode"
# Named for this run: a namespace torn down by an earlier run keeps its data, and its default
# collection name stays claimed by that run's ImageIndex.
team_a=e2e-a-${bucket#cluster-e2e-} team_b=e2e-b-${bucket#cluster-e2e-}
team() { # NS PREFIX [NAME]: a namespace with the Secrets and an ImageIndex (default collection name)
  k create namespace "$1" >/dev/null 2>&1 && k label namespace "$1" imageindex.dev/e2e=cluster >/dev/null
  k -n "$1" create secret generic catalog \
    --from-literal=url="mysql://$MYSQL_USER:$MYSQL_PASSWORD@$gw:$MYSQL_PORT/$MYSQL_DB" >/dev/null 2>&1 || true
  k -n "$1" create secret generic s3-keys --from-literal=AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" \
    --from-literal=AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" --from-literal=AWS_REGION=us-east-1 >/dev/null 2>&1 || true
  k apply -f - >/dev/null <<EOF
apiVersion: imageindex.dev/v1alpha1
kind: ImageIndex
metadata: {name: ${3:-photos}, namespace: $1}
spec:
  source: {url: "s3://$bucket/$2/", endpoint: "http://$gw:$S3_PORT", credentialsSecret: s3-keys}
  milvus: {address: "http://$gw:$MILVUS_PORT"}
  mysql: {secretRef: {name: catalog}}
  embedding: {batchSize: 16, resources: {requests: {cpu: 500m, memory: 512Mi}}}
  search: {resources: {requests: {cpu: 100m, memory: 256Mi}}}
  deletionPolicy: Delete
EOF
}
# team-b's photos are other ones, under another prefix of the same bucket.
for f in "${all[@]:500:30}"; do
  s3 -T "$f" "$IMAGEINDEX_S3_ENDPOINT/$bucket/b/${f##*/}" >/dev/null || fail "upload b/${f##*/}"
done
team "$team_a" e2e
team "$team_b" b
for ns in $team_a $team_b; do
  k -n "$ns" wait imgidx/photos --for=condition=Ready --timeout=600s >/dev/null || fail "$ns/photos not Ready"
done
a_col=$(status_of "$team_a" photos .status.collection)
b_col=$(status_of "$team_b" photos .status.collection)
[[ -n $a_col && -n $b_col && $a_col != "$b_col" ]] || fail "the two namespaces share a collection ($a_col, $b_col)"
[[ $(status_of "$team_a" photos .status.images.indexed) == "$in_bucket" ]] || fail "team-a indexed"
[[ $(status_of "$team_b" photos .status.images.indexed) == 30 ]] || fail "team-b indexed"
[[ $(catalog_rows "$a_col") == "$in_bucket" && $(catalog_rows "$b_col") == 30 ]] || fail "catalog rows per namespace"
search_in() { # NS QUERY: the top hit through that namespace's search Service
  local ip port
  ip=$(k -n "$1" get svc photos-search -o jsonpath='{.spec.clusterIP}')
  port=$(k -n "$1" get svc photos-search -o jsonpath='{.spec.ports[0].port}')
  curl -fsS --max-time 30 -F image=@"$2" -F topk=1 "http://$ip:$port/img/search" |
    "$PY" -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["key"])'
}
[[ $(search_in "$team_a" "$photos/queries/00000.jpg") == 00000.jpg ]] || fail "team-a search"
[[ $(search_in "$team_b" "$photos/queries/00500.jpg") == 00500.jpg ]] || fail "team-b search"
[[ $(search_in "$team_b" "$photos/queries/00000.jpg") != 00000.jpg ]] || fail "team-b found team-a's photo"
k -n "$team_b" delete imgidx photos --timeout 180s >/dev/null || fail "team-b's ImageIndex did not go"
milvus_has "$b_col" && fail "team-b's collection $b_col was kept"
milvus_has "$a_col" || fail "deleting team-b's index dropped team-a's collection"
[[ $(catalog_rows "$a_col") == "$in_bucket" ]] || fail "deleting team-b's index touched team-a's catalog rows"
[[ $(search_in "$team_a" "$photos/queries/00000.jpg") == 00000.jpg ]] || fail "team-a search after team-b went"
log "two namespaces on one Milvus and MySQL: $a_col ($in_bucket) and $b_col (30) apart; team-b's deletion left team-a whole"
snapshot 7-two-namespaces

# Single-namespace mode: a Role in $team_a instead of the ClusterRole.
"$HELM" --kubeconfig "$CLUSTER_KUBECONFIG" upgrade imageindex "$ROOT/charts/imageindex" -n imageindex-system \
  --reuse-values --set watchNamespace="$team_a" --wait --timeout 180s >/dev/null || fail "helm upgrade to single-namespace mode"
k -n imageindex-system rollout status deploy/imageindex-controller --timeout 120s >/dev/null || fail "single-namespace rollout"
k get clusterrole imageindex-controller >/dev/null 2>&1 && fail "the ClusterRole is still there in single-namespace mode"
k -n "$team_a" get role imageindex-controller >/dev/null || fail "no Role in $team_a"
wait_for "a controller pod to lead" 60 current_leader || fail "no controller pod leads (holder $(holder))"
team "$team_b" b other
upload "$next" 5 && next=$((next + 5))
resync "$team_a" photos || fail "team-a's resync in single-namespace mode"
[[ $(status_of "$team_a" photos .status.images.indexed) == "$in_bucket" ]] || fail "team-a indexed in single-namespace mode"
# The controller has just reconciled $team_a; $team_b is not its business any more.
[[ -z $(status_of "$team_b" other .status) && -z $(status_of "$team_b" other .metadata.finalizers) ]] ||
  fail "single-namespace mode reconciled $team_b/other"
k -n imageindex-system logs "$(holder)" | grep -q "code: 403" && fail "the controller hit RBAC in single-namespace mode"
"$HELM" --kubeconfig "$CLUSTER_KUBECONFIG" upgrade imageindex "$ROOT/charts/imageindex" -n imageindex-system \
  --reuse-values --set watchNamespace= --wait --timeout 180s >/dev/null || fail "helm upgrade back to cluster-wide"
k -n "$team_b" wait imgidx/other --for=condition=Ready --timeout=600s >/dev/null ||
  fail "$team_b/other not Ready once cluster-wide again"
log "single-namespace mode reconciled $team_a only; cluster-wide again, $team_b/other became Ready"
snapshot 7-single-namespace
for ns in $team_a $team_b; do
  k -n "$ns" delete imgidx --all --timeout 180s >/dev/null || fail "$ns's ImageIndexes did not go"
done
k delete namespace "$team_a" "$team_b" --timeout 300s >/dev/null || fail "the team namespaces did not go"
log "cluster e2e: ok"
