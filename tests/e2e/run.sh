#!/usr/bin/env bash
# The kind suite, from nothing to the Rust e2e tests: a kind cluster, the two images built and
# loaded, a one-pod FoundationDB and MinIO, the chart, a CourierCluster, then
# `cargo test -p courier-e2e --test kind` against it; then the chart again confined to one
# namespace (watchNamespace) and `cargo test -p courier-e2e --test scoped`. Needs docker, kind,
# kubectl, helm, cargo.
#
#   tests/e2e/run.sh            # create, test, and delete the kind cluster
#   KEEP=1 tests/e2e/run.sh     # keep the cluster afterwards (kind delete cluster --name courier-e2e)
set -euo pipefail
cd "$(dirname "$0")/../.."

KIND_CLUSTER=${KIND_CLUSTER:-courier-e2e}
NS=courier
# The second phase: the operator's release, the namespace it watches, and one it does not.
SCOPED_OPERATOR_NS=courier-system
SCOPED_RELEASE=courier-team-a
WATCHED_NS=courier-team-a
OTHER_NS=courier-team-b
FDB_VERSION=${FDB_VERSION:-7.3.63}

cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then kind delete cluster --name "$KIND_CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "== kind cluster"
kind create cluster --name "$KIND_CLUSTER" --config tests/e2e/kind.yaml --wait 120s

echo "== images"
docker build -f docker/courier.Dockerfile --build-arg FDB_VERSION="$FDB_VERSION" -t courier:e2e .
docker build -f docker/courier-operator.Dockerfile -t courier-operator:e2e .
kind load docker-image courier:e2e courier-operator:e2e --name "$KIND_CLUSTER"

echo "== FoundationDB and MinIO"
kubectl create namespace "$NS"
sed "s/FDB_VERSION/$FDB_VERSION/" tests/e2e/foundationdb.yaml | kubectl -n "$NS" apply -f -
kubectl -n "$NS" apply -f tests/e2e/minio.yaml
kubectl -n "$NS" wait pod -l app=fdb --for=jsonpath='{.status.phase}'=Running --timeout=300s
kubectl -n "$NS" exec fdb-0 -- fdbcli --exec "configure new single memory" --timeout 60
kubectl -n "$NS" wait pod -l app=fdb --for=condition=Ready --timeout=300s
kubectl -n "$NS" exec fdb-0 -- cat /var/fdb/fdb.cluster > "${TMPDIR:-/tmp}/fdb.cluster"
kubectl -n "$NS" create secret generic fdb --from-file=fdb.cluster="${TMPDIR:-/tmp}/fdb.cluster"
kubectl -n "$NS" rollout status deploy/minio --timeout=300s
kubectl -n "$NS" run make-bucket --rm -i --restart=Never --image=minio/mc:RELEASE.2025-04-16T18-13-26Z \
  --command -- sh -c 'mc alias set e2e http://minio:9000 courier courier-e2e-secret && mc mb -p e2e/courier-media'

echo "== secrets"
JWT_SECRET=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
kubectl -n "$NS" create secret generic courier-jwt --from-literal=secret="$JWT_SECRET"
kubectl -n "$NS" create secret generic courier-token --from-literal=token="$(head -c 48 /dev/urandom | base64 | tr -d '\n')"
kubectl -n "$NS" create secret generic courier-s3 \
  --from-literal=AWS_ACCESS_KEY_ID=courier --from-literal=AWS_SECRET_ACCESS_KEY=courier-e2e-secret \
  --from-literal=AWS_REGION=us-east-1 --from-literal=AWS_ENDPOINT=http://minio:9000 \
  --from-literal=AWS_ALLOW_HTTP=true

echo "== operator and cluster"
helm install courier charts/courier -n "$NS" \
  --set image.repository=courier-operator --set image.tag=e2e --set image.pullPolicy=Never --wait
kubectl -n "$NS" apply -f tests/e2e/cluster.yaml
kubectl -n "$NS" wait couriercluster/e2e --for=condition=Ready --timeout=600s

echo "== tests"
COURIER_E2E=1 COURIER_E2E_NAMESPACE="$NS" COURIER_E2E_CLUSTER=e2e \
COURIER_E2E_GATEWAY=ws://127.0.0.1:30080 COURIER_E2E_JWT_SECRET="$JWT_SECRET" \
  cargo test -p courier-e2e --test kind -- --test-threads=1 --nocapture

echo "== one namespace only (watchNamespace)"
# A cluster-wide operator beside a scoped one would reconcile every namespace too
# (docs/operator.md, "One namespace only"): the first release goes; the CRDs stay (Helm keeps
# crds/), and the cluster e2e keeps running unreconciled.
helm uninstall courier -n "$NS" --wait
kubectl create namespace "$WATCHED_NS"
kubectl create namespace "$OTHER_NS"
for ns in "$WATCHED_NS" "$OTHER_NS"; do
  kubectl -n "$ns" create secret generic courier-jwt --from-literal=secret="$JWT_SECRET"
done
# A release name of its own: the user roles are cluster-wide and named after the release.
helm install "$SCOPED_RELEASE" charts/courier -n "$SCOPED_OPERATOR_NS" --create-namespace \
  --set watchNamespace="$WATCHED_NS" \
  --set image.repository=courier-operator --set image.tag=e2e --set image.pullPolicy=Never --wait
COURIER_E2E=1 COURIER_E2E_NAMESPACE="$WATCHED_NS" COURIER_E2E_CLUSTER=scoped \
COURIER_E2E_GATEWAY=ws://127.0.0.1:30081 COURIER_E2E_JWT_SECRET="$JWT_SECRET" \
COURIER_E2E_OTHER_NAMESPACE="$OTHER_NS" COURIER_E2E_OPERATOR_NAMESPACE="$SCOPED_OPERATOR_NS" \
COURIER_E2E_OPERATOR_ACCOUNT="$SCOPED_RELEASE" \
  cargo test -p courier-e2e --test scoped -- --test-threads=1 --nocapture
helm uninstall "$SCOPED_RELEASE" -n "$SCOPED_OPERATOR_NS" --wait
kubectl delete namespace "$WATCHED_NS" "$OTHER_NS" "$SCOPED_OPERATOR_NS" --wait=false
