#!/usr/bin/env bash
# Builds the real control plane the cluster tests run against — kube-apiserver,
# kube-controller-manager and kube-scheduler from k8s.io/kubernetes, etcd from go.etcd.io/etcd/server/v3, at the
# versions go.mod pins — into a cache folder keyed by those versions and go.sum, and prints
# that folder. A second run finds the binaries there and builds nothing.
#
#   tests/controlplane/build.sh          build when missing, print the folder
#   tests/controlplane/build.sh --path   print the folder only (exit 1 when not built)
set -euo pipefail
# Go as the machines install it, when the PATH lacks it.
command -v go >/dev/null 2>&1 || [ ! -x /usr/local/go/bin/go ] || PATH="$PATH:/usr/local/go/bin"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

k8s="$(awk '$1=="k8s.io/kubernetes"{print $2; exit}' go.mod)"
etcd="$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' go.mod)"
sum="$(sha256sum go.sum | cut -c1-12)"
root="${NK3_CONTROLPLANE_CACHE:-$here/../../.cache/controlplane}"
out="$root/kubernetes-$k8s-etcd-$etcd-$sum"
bins=(kube-apiserver kube-controller-manager kube-scheduler etcd)

built() {
  for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}

if [[ "${1:-}" == "--path" ]]; then
  built || exit 1
  cd "$out" && pwd
  exit 0
fi

if ! built; then
  command -v go >/dev/null || { echo "build.sh: go is not installed (Go 1.26 builds the control plane)" >&2; exit 1; }
  mkdir -p "$out.partial"
  start=$SECONDS
  echo "building Kubernetes $k8s (kube-apiserver, kube-controller-manager, kube-scheduler) and etcd $etcd" >&2
  echo "  into $out (a cold build takes about 6 minutes on 2 cores)" >&2
  export CGO_ENABLED=0 GOFLAGS=-mod=readonly
  # Each binary on its own line of progress: a cold build takes minutes.
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    echo "  go build k8s.io/kubernetes/cmd/$b" >&2
    go build -trimpath -ldflags=-s -o "$out.partial/$b" "k8s.io/kubernetes/cmd/$b"
  done
  echo "  go build ./cmd/etcd" >&2
  go build -trimpath -ldflags=-s -o "$out.partial/etcd" ./cmd/etcd
  rm -rf "$out"
  mv "$out.partial" "$out"
  echo "built in $((SECONDS - start)) s" >&2
fi
cd "$out" && pwd
