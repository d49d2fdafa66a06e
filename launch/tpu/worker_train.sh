#!/usr/bin/env bash
# Runs ON each TPU worker (train.sh and stop.sh call it through `gcloud ... ssh --worker=all`).
#   bash launch/tpu/worker_train.sh TRAIN_FLAGS...   start python -m signclip_jax.train, detached
#   bash launch/tpu/worker_train.sh --stop           SIGTERM it (it checkpoints, then exits)
# Starting while a run is alive does nothing, so train.sh / resume.sh can be repeated.
# Environment: SIGNCLIP_VENV (~/signclip-venv), SIGNCLIP_LOG_DIR (~/signclip-logs),
# SIGNCLIP_DATA_GCS (gs:// folder to copy first) and SIGNCLIP_DATA_LOCAL (/tmp/signclip-data).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
venv=${SIGNCLIP_VENV:-$HOME/signclip-venv}
log_dir=${SIGNCLIP_LOG_DIR:-$HOME/signclip-logs}
data_gcs=${SIGNCLIP_DATA_GCS:-}
data_local=${SIGNCLIP_DATA_LOCAL:-/tmp/signclip-data}
pid_file=$log_dir/train.pid
host=$(hostname)

running_pid() {
  local pid
  [[ -f $pid_file ]] || return 1
  pid=$(<"$pid_file")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit 0
fi
if [[ ${1:-} == --stop ]]; then
  if pid=$(running_pid); then
    kill -TERM "$pid"
    echo "$host: sent SIGTERM to training (pid $pid); it saves a checkpoint and exits"
  else
    echo "$host: no training running"
  fi
  exit 0
fi

if pid=$(running_pid); then
  echo "$host: training already running (pid $pid), log $log_dir/train.log"
  exit 0
fi
[[ -x $venv/bin/python ]] || { echo "$host: no venv at $venv (run install.sh)" >&2; exit 2; }
mkdir -p "$log_dir"

if [[ -n $data_gcs ]]; then
  # Packed shards are read from local disk; rsync only copies what changed on a re-run.
  mkdir -p "$data_local"
  echo "$host: copying $data_gcs to $data_local"
  gcloud storage rsync --recursive "$data_gcs" "$data_local"
fi

# jax.distributed.initialize() with auto-detection on the TPU slice (one process per worker):
# signclip_jax/distributed.py calls it when SIGNCLIP_DISTRIBUTED=1. Orbax needs it to write
# one checkpoint from all hosts.
export SIGNCLIP_DISTRIBUTED=1
{
  echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') $host: python -m signclip_jax.train $*"
} >>"$log_dir/train.log"
# Detached from the ssh session (setsid + nohup, no stdin); a small bash parent waits for the
# trainer and records its exit status at the end of the log.
# shellcheck disable=SC2016  # $1.. are expanded by the inner bash
nohup setsid bash -c '
  "$1" -m signclip_jax.train "${@:3}" &
  echo $! >"$2"
  wait $!
  rc=$?
  echo "=== $(date -u "+%Y-%m-%dT%H:%M:%SZ") training exited with status $rc"
' worker_train "$venv/bin/python" "$pid_file" "$@" >>"$log_dir/train.log" 2>&1 </dev/null &
for _ in 1 2 3 4 5 6 7 8 9 10; do
  if running_pid >/dev/null; then break; fi
  sleep 0.5
done
echo "$host: training started (pid $(cat "$pid_file" 2>/dev/null || echo '?')), log $log_dir/train.log"
