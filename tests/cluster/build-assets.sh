#!/usr/bin/env bash
# Build the control-plane binaries the cluster tests run against, the way
# controller-runtime's envtest uses them: a real etcd, kube-apiserver and
# kube-controller-manager, no kubelet, no scheduler.
#
# No prebuilt kube-apiserver can be downloaded here, so this script compiles
# them once from the published Go modules:
#   * kube-apiserver, kube-controller-manager from k8s.io/kubernetes@$KONDENSE_K8S_VERSION
#   * etcd from go.etcd.io/etcd/server/v3 at exactly the version that
#     k8s.io/kubernetes requires (the etcd that release is tested against).
#
# k8s.io/kubernetes is not meant to be consumed as a module: its go.mod
# requires every k8s.io/* staging module at v0.0.0 and replaces them with
# ./staging/src/... paths, and replace directives of a dependency are ignored.
# So the throwaway module below re-states those replaces, pointing each staging
# module at its published same-release tag (k8s.io/api => k8s.io/api v0.37.2
# for Kubernetes v1.37.2). The list is read from the release's own go.mod so it
# never drifts.
#
# The result lands outside the repository, in
#   ${KONDENSE_ASSETS_CACHE:-$HOME/.cache/kondense/kube-assets}/<k8s-version>/
# and the script is idempotent: when the three binaries exist it only prints
# the directory. If KUBEBUILDER_ASSETS names a directory holding all three
# binaries, that directory is used as is. The last line of stdout is always the
# assets directory; everything else (go's progress) goes to stderr.
#
# Cost, measured on a 2-core machine that was busy with other builds: a cold
# build (empty module and build caches) took 13m43s wall and 14m15s of CPU for
# ~250 MB of binaries; with warm Go caches a rebuild took 53s (mostly linking);
# when the binaries exist the script returns at once. The throwaway module is
# kept in <assets dir>/src: its go.mod/go.sum pin every dependency of the build.
set -euo pipefail

readonly BINARIES=(etcd kube-apiserver kube-controller-manager)
K8S_VERSION="${KONDENSE_K8S_VERSION:-v1.37.2}"

has_all_binaries() {
    local dir="$1" bin
    for bin in "${BINARIES[@]}"; do
        [[ -x "$dir/$bin" ]] || return 1
    done
}

log() { printf '[build-assets] %s\n' "$*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && has_all_binaries "$KUBEBUILDER_ASSETS"; then
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi

ASSETS_DIR="${KONDENSE_ASSETS_CACHE:-$HOME/.cache/kondense/kube-assets}/$K8S_VERSION"
if has_all_binaries "$ASSETS_DIR"; then
    echo "$ASSETS_DIR"
    exit 0
fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$GO" ]] || { log "no Go toolchain found (set GO=/path/to/go)"; exit 1; }

mkdir -p "$ASSETS_DIR"
# Serialize concurrent builds (e.g. parallel test sessions): the loser of the
# race waits, then finds the binaries and returns at once.
exec 9>"$ASSETS_DIR/.build.lock"
flock 9
if has_all_binaries "$ASSETS_DIR"; then
    echo "$ASSETS_DIR"
    exit 0
fi

# Static, stripped, reproducible binaries. The default GOPATH/GOCACHE are kept
# on purpose so a rebuild on the same machine reuses the module and build caches.
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath -buildvcs=false"
export GO111MODULE=on

# v1.37.2 -> staging modules are tagged v0.37.2; major 1, minor 37.
semver="${K8S_VERSION#v}"
IFS=. read -r k8s_major k8s_minor k8s_patch <<<"${semver%%[-+]*}"
STAGING_VERSION="v0.${k8s_minor}.${k8s_patch}${semver#"${semver%%[-+]*}"}"

SRC="$ASSETS_DIR/src"
rm -rf "$SRC"
mkdir -p "$SRC"
cd "$SRC"

start=$SECONDS
log "resolving k8s.io/kubernetes@$K8S_VERSION (staging modules at $STAGING_VERSION)"
if ! download="$("$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION")"; then
    log "could not download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy: $download"
    exit 1
fi
upstream_gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$download")"
[[ -f "$upstream_gomod" ]] || { log "no go.mod for k8s.io/kubernetes@$K8S_VERSION"; exit 1; }

# The throwaway module: same language version as the release, and one replace
# per staging module listed in the release's go.mod.
{
    echo "module kondense.invalid/kube-assets"
    echo
    grep -E '^go [0-9.]+$' "$upstream_gomod"
    grep -E '^godebug ' "$upstream_gomod" || true
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/.*$#\t\1 => \1 '"$STAGING_VERSION"'#p' "$upstream_gomod"
    echo ")"
} >go.mod
log "$(grep -c ' => ' go.mod) staging replace directives written to $SRC/go.mod"

# `tool` directives (Go >= 1.24) record the main packages we build, so the
# requirements needed to compile them are tracked in go.mod/go.sum.
"$GO" get -tool \
    "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION"
ETCD_VERSION="$("$GO" list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)"
log "etcd: go.etcd.io/etcd/server/v3@$ETCD_VERSION (the version k8s.io/kubernetes requires)"
"$GO" get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"

# What hack/lib/version.sh stamps into release builds, so /version and the
# components' --version tell the truth.
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
version_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION"
    version_ldflags+=" -X $pkg.gitMajor=$k8s_major -X $pkg.gitMinor=$k8s_minor"
    version_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

# Build into a staging directory and move into place only on success, so an
# interrupted build never looks finished.
out="$ASSETS_DIR/.partial"
rm -rf "$out"
mkdir -p "$out"
log "building kube-apiserver and kube-controller-manager (slow on a cold cache)"
"$GO" build -ldflags "-s -w$version_ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager
log "building etcd"
"$GO" build -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3

for bin in "${BINARIES[@]}"; do
    mv -f "$out/$bin" "$ASSETS_DIR/$bin"
done
rmdir "$out"
cat >"$ASSETS_DIR/VERSIONS" <<EOF
kubernetes $K8S_VERSION
etcd $ETCD_VERSION
go $("$GO" env GOVERSION)
EOF
log "done in $((SECONDS - start))s: $(tr '\n' ' ' <"$ASSETS_DIR/VERSIONS")"
echo "$ASSETS_DIR"
