#!/usr/bin/env bash
# Install tntsearch into the Python that runs Ray on a cluster node (Ray's own image, or any
# Python 3.11 with pip): FFCV's Debian build libraries, then this checkout (editable).
#
# Used by jobs/cluster.yaml (setup_commands, on every node) and jobs/Dockerfile (the KubeRay
# image). `make setup` does the same on a workstation, into .venv/ and with the test-only
# Chromium; a Ray node needs the project in the interpreter that `ray start` runs, because
# Ray starts its workers with that interpreter.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
# g++ builds FFCV's C extension; Ray's CPU images remove it, its GPU images keep it.
apt_packages="libopencv-dev libturbojpeg0-dev pkg-config g++"

if ! { command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg && command -v g++ >/dev/null; }; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $apt_packages
fi

# NOTE: Ray's image already has ray==2.60.0 with its dashboard (ray[default]); the project's
# pin `ray[tune,train]==2.60.*` keeps it and adds Tune/Train's dependencies.
"$python" -m pip install -q -e "$root"
"$python" -c "import tntsearch, ffcv, ray, optuna, mlflow, timm; print('tntsearch ready: ray', ray.__version__)"
