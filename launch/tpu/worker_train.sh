#!/usr/bin/env bash
# Runs ON each TPU worker, as root (the startup script, train.sh, resume.sh and stop.sh call it):
#   worker_train.sh start [WORKER_OPTIONS --] TRAIN_FLAGS...   start training, detached
#   worker_train.sh --boot        start the run saved in $SIGNCLIP_WORKDIR/launch/run.args (the
#                                 startup script: every worker after a (re)provisioning)
#   worker_train.sh --stop [--wait]   SIGTERM the trainer (it saves a checkpoint and exits) and
#                                 keep it from restarting; --wait: until it has exited (5 min)
#   worker_train.sh --status      one line "signclip-status HOST running|stopped"
# WORKER_OPTIONS (train.sh writes them): --data=gs://... --data-mode=copy|fuse --splits=a,b
# (copy: each split folder to $SIGNCLIP_ROOT/data/SPLIT; fuse: gcsfuse mount of the bucket at
# $SIGNCLIP_ROOT/gcs/BUCKET), --hub-offline (HF_HUB_OFFLINE=1: the text model is staged).
# Starting while a run is alive does nothing. Everything after the start runs detached (setsid,
# nohup), data staging included: a dropped ssh session kills nothing. The trainer is restarted
# when it fails (not on exit 0: finished or saved after SIGTERM; not on exit 2: a user error),
# at most SIGNCLIP_MAX_RESTARTS (5) times, waiting SIGNCLIP_RESTART_DELAY_S (60) x the attempt:
# when one worker's process dies the others fail too, and all rejoin together.
# Environment: SIGNCLIP_ROOT (/opt/signclip), SIGNCLIP_VENV ($SIGNCLIP_ROOT/venv),
# SIGNCLIP_LOG_DIR ($SIGNCLIP_ROOT/logs).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=${SIGNCLIP_ROOT:-/opt/signclip}
venv=${SIGNCLIP_VENV:-$root/venv}
log_dir=${SIGNCLIP_LOG_DIR:-$root/logs}
pid_file=$log_dir/train.pid            # the supervisor (the detached loop below)
stop_file=$log_dir/stop-requested
host=$(hostname)

alive() {  # PID_FILE -> prints the pid when that process lives
  local pid
  [[ -f $1 ]] || return 1
  pid=$(<"$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

case ${1:-} in
  -h | --help)
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
  --status)
    if alive "$pid_file" >/dev/null; then state=running; else state=stopped; fi
    echo "signclip-status $host $state"
    exit 0
    ;;
  --stop)
    mkdir -p "$log_dir"
    touch "$stop_file"
    if pid=$(alive "$pid_file"); then
      # The trainer is the supervisor's child: SIGTERM it (it checkpoints); the supervisor
      # then sees the stop request and does not restart it.
      pkill -TERM -P "$pid" 2>/dev/null || true
      echo "$host: sent SIGTERM to training (supervisor pid $pid); it saves a checkpoint and exits"
      if [[ ${2:-} == --wait ]]; then
        for _ in $(seq 300); do
          alive "$pid_file" >/dev/null || break
          sleep 1
        done
        if alive "$pid_file" >/dev/null; then echo "$host: still running after 5 minutes" >&2; exit 1; fi
        echo "$host: stopped"
      fi
    else
      echo "$host: no training running"
    fi
    exit 0
    ;;
  --boot)
    : "${SIGNCLIP_WORKDIR:?SIGNCLIP_WORKDIR is not set}"
    saved=$(mktemp)
    if ! gcloud storage cp "$SIGNCLIP_WORKDIR/launch/run.args" "$saved" 2>/dev/null; then
      echo "$host: no run saved in $SIGNCLIP_WORKDIR/launch/run.args (train.sh saves it): not starting"
      exit 0
    fi
    mapfile -t args <"$saved"
    rm -f "$saved"
    set -- "${args[@]}"
    ;;
  start) shift ;;
esac

if pid=$(alive "$pid_file"); then
  echo "$host: training already running (pid $pid), log $log_dir/train.log"
  exit 0
fi
[[ -x $venv/bin/python ]] || { echo "$host: no venv at $venv (run install.sh)" >&2; exit 2; }
mkdir -p "$log_dir"
rm -f "$stop_file"

# Worker options before "--" (when there is a "--"), trainer flags after.
worker_opts=()
if [[ " $* " == *" -- "* ]]; then
  while (($#)) && [[ $1 != -- ]]; do worker_opts+=("$1"); shift; done
  shift
fi
data="" data_mode=copy splits=train,val hub_offline=0
for opt in ${worker_opts[@]+"${worker_opts[@]}"}; do
  case $opt in
    --data=*) data=${opt#*=} ;;
    --data-mode=*) data_mode=${opt#*=} ;;
    --splits=*) splits=${opt#*=} ;;
    --hub-offline) hub_offline=1 ;;
    *) echo "$host: unknown worker option $opt" >&2; exit 2 ;;
  esac
done

echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') $host: python -m signclip_jax.train $*" >>"$log_dir/train.log"
export PID_FILE=$pid_file STOP_FILE=$stop_file PYTHON=$venv/bin/python ROOT=$root DATA=$data \
  DATA_MODE=$data_mode SPLITS=$splits HUB_OFFLINE=$hub_offline \
  RETRY_S=${SIGNCLIP_RETRY_S:-10} MAX_RESTARTS=${SIGNCLIP_MAX_RESTARTS:-5} \
  DELAY_S=${SIGNCLIP_RESTART_DELAY_S:-60}
# Detached from the ssh session or the startup script (setsid + nohup, no stdin): stage the
# data, then run the trainer, restarting it after a failure.
# shellcheck disable=SC2016  # expanded by the inner bash
nohup setsid bash -c '
  set -uo pipefail
  echo $$ >"$PID_FILE"
  say() { echo "=== $(date -u "+%Y-%m-%dT%H:%M:%SZ") $*"; }
  retry() {
    local n=1
    until "$@"; do
      ((n >= 5)) && return 1
      sleep $((RETRY_S * n * n))
      n=$((n + 1))
    done
  }
  if [[ -n $DATA ]]; then
    if [[ $DATA_MODE == copy ]]; then
      # Only the splits training reads, each to its own folder; rsync skips what is there.
      IFS=, read -r -a names <<<"$SPLITS"
      for split in "${names[@]}"; do
        say "copying $DATA/$split to $ROOT/data/$split"
        mkdir -p "$ROOT/data/$split"
        retry gcloud storage rsync --recursive "$DATA/$split" "$ROOT/data/$split" ||
          { say "cannot copy $DATA/$split"; exit 1; }
      done
    else
      bucket=${DATA#gs://}
      bucket=${bucket%%/*}
      mount=$ROOT/gcs/$bucket
      if ! mountpoint -q "$mount"; then
        say "mounting gs://$bucket at $mount (gcsfuse, read-only)"
        mkdir -p "$mount"
        retry gcsfuse --implicit-dirs -o ro "$bucket" "$mount" || { say "cannot mount gs://$bucket"; exit 1; }
      fi
    fi
  fi
  export SIGNCLIP_DISTRIBUTED=1  # jax.distributed.initialize() with auto-detection on the slice
  if [[ $HUB_OFFLINE == 1 ]]; then export HF_HUB_OFFLINE=1; fi
  attempt=0
  while true; do
    "$PYTHON" -m signclip_jax.train "$@" &
    wait $!
    rc=$?
    say "training exited with status $rc"
    if ((rc == 0 || rc == 2)) || [[ -f $STOP_FILE ]]; then exit $rc; fi
    attempt=$((attempt + 1))
    if ((attempt > MAX_RESTARTS)); then say "giving up after $MAX_RESTARTS restarts"; exit $rc; fi
    say "restarting in $((DELAY_S * attempt)) s (restart $attempt of $MAX_RESTARTS)"
    sleep $((DELAY_S * attempt))
    [[ -f $STOP_FILE ]] && exit $rc
  done
' worker_train "$@" >>"$log_dir/train.log" 2>&1 </dev/null &
for _ in 1 2 3 4 5 6 7 8 9 10; do
  if alive "$pid_file" >/dev/null; then break; fi
  sleep 0.5
done
echo "$host: training started (pid $(cat "$pid_file" 2>/dev/null || echo '?')), log $log_dir/train.log"
