#!/bin/sh
# Run a search on a Ray cluster: `python -m tntsearch.run SPEC [ARGS...]`, started from the
# directory that every node mounts at the same path ($TNTSEARCH_SHARED_DIR).
#
# Why: the spec's relative paths (data/*.beton, `storage: ray_results`, and the default MLflow
# store mlflow.db) resolve against the directory the search starts in (tntsearch.spec.load_spec).
# A Ray job starts in a private copy of --working-dir on the head node, which no other node
# sees; starting from the shared directory makes the same spec name shared storage instead,
# so one spec runs unchanged on a laptop (from the repo root) and on a cluster.
#
# Usage (the entrypoint of jobs/rayjob.yaml and of `ray job submit`, see docs/cluster.md):
#   TNTSEARCH_SHARED_DIR=/mnt/shared sh jobs/run_search.sh search_spaces/tnt_s.yaml [--resume]
# PYTHON names the interpreter (default: python).
set -eu

if [ "$#" -lt 1 ]; then
    echo "usage: TNTSEARCH_SHARED_DIR=DIR sh jobs/run_search.sh SPEC.yaml [tntsearch.run options]" >&2
    exit 2
fi
shared="${TNTSEARCH_SHARED_DIR:-}"
if [ -z "$shared" ] || [ ! -d "$shared" ]; then
    echo "error: TNTSEARCH_SHARED_DIR must name a directory that every node mounts, got '$shared'" >&2
    exit 2
fi
spec="$1"
shift
case "$spec" in
    /*) ;;
    *) spec="$(pwd)/$spec" ;;
esac

cd "$shared"
exec "${PYTHON:-python}" -m tntsearch.run "$spec" "$@"
