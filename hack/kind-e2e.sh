#!/usr/bin/env bash
# The operator end to end on a real cluster (kind): build the image, install the chart, run MinIO,
# MariaDB, the milvus-operator and a Milvus it makes, seed a bucket, apply an ImageIndex, wait for Ready, and search
# through the search Service. Needs docker, kind, kubectl, helm and python3 with Pillow + boto3:
# it runs in GitHub Actions (.github/workflows/e2e.yml), not on our build machines, which have no
# container engine; there, hack/cluster-e2e.sh runs the operator on a real single-node cluster
# (Milvus by address: the milvus-operator's images cannot be pulled there).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-imageindex-e2e}
NODE_IMAGE=${NODE_IMAGE:-kindest/node:v1.33.1}
IMAGE=${IMAGE:-ghcr.io/imageindex/imageindex:e2e}
N=${N:-40}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --wait 180s
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

helm upgrade --install imageindex charts/imageindex -n imageindex-system --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never --wait
# The real milvus-operator, and a Milvus it runs; the ImageIndex refers to it (spec.milvus.ref).
MILVUS_OPERATOR=${MILVUS_OPERATOR:-1.3.8}
helm upgrade --install milvus-operator -n milvus-operator --create-namespace --wait --timeout 10m \
  "https://github.com/zilliztech/milvus-operator/releases/download/v$MILVUS_OPERATOR/milvus-operator-$MILVUS_OPERATOR.tgz"
kubectl apply -f e2e/kind/backends.yaml
kubectl apply -f e2e/kind/milvus.yaml
kubectl -n e2e rollout status deploy/minio deploy/mariadb --timeout=15m
kubectl -n e2e wait milvus/vectors --for=condition=MilvusReady --timeout=20m

# Seed the bucket from here: N photos-like JPEGs through a port-forward to MinIO.
kubectl -n e2e port-forward svc/minio 19000:9000 >/dev/null &
sleep 3
python3 - "$work" "$N" <<'PYEOF'
import io, random, sys, boto3
from PIL import Image, ImageDraw
out, n = sys.argv[1], int(sys.argv[2])
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:19000", aws_access_key_id="e2e-access",
                  aws_secret_access_key="e2e-secret-key", region_name="us-east-1")
s3.create_bucket(Bucket="photos")
for i in range(n):
    rnd = random.Random(i)
    img = Image.new("RGB", (500, 375), tuple(rnd.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rnd.randrange(450), rnd.randrange(325)
        d.ellipse((x, y, x + rnd.randrange(20, 200), y + rnd.randrange(20, 200)), fill=tuple(rnd.randrange(256) for _ in range(3)))
    buf = io.BytesIO(); img.save(buf, "JPEG", quality=90)
    open(f"{out}/{i}.jpg", "wb").write(buf.getvalue())
    s3.put_object(Bucket="photos", Key=f"e2e/{i}.jpg", Body=buf.getvalue())
PYEOF

kubectl apply -f e2e/kind/imageindex.yaml
kubectl -n e2e get imgidx -w &
kubectl -n e2e wait imgidx/photos --for=jsonpath='{.status.phase}'=Ready --timeout=20m
kubectl -n e2e get imgidx photos -o jsonpath='{.status.images}{"\n"}'
[[ $(kubectl -n e2e get imgidx photos -o jsonpath='{.status.images.indexed}') == "$N" ]]

# Search through the search Service: the query's own original must come first.
kubectl -n e2e port-forward svc/photos-search 18080:80 >/dev/null &
sleep 3
top=$(curl -fsS -F image=@"$work/7.jpg" 'http://127.0.0.1:18080/img/search?topk=1' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["key"])')
[[ $top == 7.jpg ]] || { echo "top hit $top, expected 7.jpg" >&2; exit 1; }

kubectl -n e2e delete imgidx photos --timeout=5m
echo "kind e2e: ok"
