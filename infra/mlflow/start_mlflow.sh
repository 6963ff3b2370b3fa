#!/usr/bin/env bash
# Start the MLflow tracking server + model registry that every raybooth job on the cluster logs to.
#
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow bash infra/mlflow/start_mlflow.sh
#
# Runs beside the Ray head (ray_cluster.yaml starts it after `ray start --head`; on Kubernetes
# infra/k8s/mlflow.yaml runs it as its own Deployment). Every setting comes from the environment, so
# secrets (a database password inside MLFLOW_BACKEND_STORE_URI) reach it from SSM Parameter Store or a
# Kubernetes Secret and are never written into a file in the repo.
#
#   MLFLOW_ARTIFACTS_DESTINATION  required: s3://bucket/prefix where the server stores artifacts
#                                 (checkpoints, models). Clients upload through the server
#                                 (--serve-artifacts), so Ray workers need no S3 rights for MLflow.
#   MLFLOW_BACKEND_STORE_URI      runs/experiments/registry database; default: sqlite in MLFLOW_DATA_DIR.
#                                 Use postgresql://user:pass@host/db for more than one server worker
#                                 or a head that may be replaced.
#   MLFLOW_DATA_DIR               where the default sqlite file lives (default /home/ray/mlflow: a volume)
#   MLFLOW_HOST / MLFLOW_PORT     bind address (default 0.0.0.0 so workers reach it) and port (5000)
#   MLFLOW_WORKERS                server processes (default: 1 on sqlite, whose writes lock the whole
#                                 file, 4 on a real database)
#   MLFLOW_ALLOWED_HOSTS          extra Host headers to accept, e.g. a k8s service name; MLflow accepts
#                                 localhost and private IPs by default (DNS-rebinding protection)
#   MLFLOW_PID_FILE               if set: stop the server whose pid is in it, then record this one
#                                 (so `ray up` restarts MLflow instead of starting a second one)
#   MLFLOW_DRY_RUN=1              print the command instead of running it (used by the tests)
set -euo pipefail

if [[ -z "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]]; then
  echo "start_mlflow.sh: set MLFLOW_ARTIFACTS_DESTINATION to the artifact store, e.g. s3://my-bucket/mlflow" >&2
  exit 2
fi

data_dir="${MLFLOW_DATA_DIR:-/home/ray/mlflow}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${data_dir}/mlflow.db}"
workers="${MLFLOW_WORKERS:-4}"
if [[ "$backend" == sqlite:* ]]; then
  mkdir -p "$data_dir"
  workers="${MLFLOW_WORKERS:-1}"
fi

cmd=(mlflow server
  --backend-store-uri "$backend"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "${MLFLOW_HOST:-0.0.0.0}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "$workers")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  cmd+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

if [[ "${MLFLOW_DRY_RUN:-0}" == 1 ]]; then
  for arg in "${cmd[@]}"; do  # one argument per line; never the backend URI itself (it may hold a password)
    if [[ "$arg" == "$backend" ]]; then echo "<backend-store-uri>"; else echo "$arg"; fi
  done
  exit 0
fi

# Running and not a zombie: an orphan's zombie lingers where PID 1 does not reap (as in many containers).
alive() {
  local state
  state="$(sed -n 's/^[0-9]* (.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)"
  [[ -n "$state" && "$state" != Z ]]
}

if [[ -n "${MLFLOW_PID_FILE:-}" ]]; then
  old_pid="$(cat "$MLFLOW_PID_FILE" 2>/dev/null || true)"
  # Only a previous MLflow server: a stale pid file may name a pid the system has given to something else.
  if [[ "$old_pid" =~ ^[0-9]+$ ]] && alive "$old_pid" && tr '\0' ' ' < "/proc/$old_pid/cmdline" | grep -q mlflow; then
    kill "$old_pid"
    for _ in $(seq 30); do alive "$old_pid" || break; sleep 1; done  # it must free the port first
  fi
  echo $$ > "$MLFLOW_PID_FILE"
fi

echo "start_mlflow.sh: artifacts in $MLFLOW_ARTIFACTS_DESTINATION, listening on ${MLFLOW_HOST:-0.0.0.0}:${MLFLOW_PORT:-5000}" >&2
exec "${cmd[@]}"
