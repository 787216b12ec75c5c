#!/usr/bin/env bash
# The MLflow tracking server of a cluster: the store a search logs to and the UI people browse.
#
# Usage: jobs/mlflow_server.sh DIR [--background]
#   DIR holds the store, laid out like a local run in the repo root: DIR/mlflow.db (SQLite
#   backend) and DIR/mlartifacts/ (artifacts, served through the server, so clients need no
#   access to DIR). A search started in DIR with no tracking URI (jobs/run_search.sh, spec
#   `mlflow.tracking_uri: null`) writes to this same DIR/mlflow.db, so it shows up here too.
#   --background starts the server detached (pid in DIR/mlflow-server.pid, log in
#   DIR/mlflow-server.log), waits until it answers /health, and does nothing if one already
#   answers on the port; without it the server runs in the foreground (a container's command).
# Environment:
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (1: one SQLite writer),
#   MLFLOW_ALLOWED_HOSTS: extra Host headers to accept, e.g. "mlflow:*,mlflow.*" for a Kubernetes
#     Service. MLflow 3.17 answers 403 to Host headers outside localhost and private IPs, and a
#     given --allowed-hosts replaces those defaults, so they are added back here. Entries match
#     the whole header, port included ("mlflow" does not match "mlflow:5000"; "mlflow:*" does).
#   PYTHON: the interpreter with mlflow installed (default: python).
set -euo pipefail

usage="usage: jobs/mlflow_server.sh DIR [--background]"
dir="${1:?$usage}"
background=0
if [ "${2:-}" = "--background" ]; then background=1; elif [ -n "${2:-}" ]; then echo "$usage" >&2; exit 2; fi

python="${PYTHON:-python}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
mkdir -p "$dir/mlartifacts"
dir="$(cd "$dir" && pwd)"

# No outside network on cluster nodes; and the GenAI job runner (7 huey consumer processes
# that outlive a stopped server) is not needed to track searches.
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(server --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-1}"
      --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "$dir/mlartifacts")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    allowed="$MLFLOW_ALLOWED_HOSTS,localhost:*,127.0.0.1:*,10.*,192.168.*"
    for i in $(seq 16 31); do allowed="$allowed,172.$i.*"; done
    args+=(--allowed-hosts "$allowed")
fi

healthy() {
    "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/health" >/dev/null 2>&1
}

if [ "$background" -eq 0 ]; then
    exec "$python" -m mlflow "${args[@]}"
fi
if healthy; then
    echo "an MLflow server already answers on port $port"
    exit 0
fi
nohup "$python" -m mlflow "${args[@]}" >"$dir/mlflow-server.log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$dir/mlflow-server.pid"
for _ in $(seq "${MLFLOW_START_TIMEOUT:-180}"); do
    if healthy; then
        echo "MLflow server (pid $pid) at http://$host:$port, store $dir"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "error: the MLflow server exited; its log:" >&2
        tail -n 30 "$dir/mlflow-server.log" >&2
        exit 1
    fi
    sleep 1
done
echo "error: no answer on http://127.0.0.1:$port/health after ${MLFLOW_START_TIMEOUT:-180} s; stopping it (log: $dir/mlflow-server.log)" >&2
kill "$pid" 2>/dev/null || true
exit 1
