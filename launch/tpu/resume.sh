#!/usr/bin/env bash
# Brings a run back after a spot preemption. The slice's own startup script restarts training
# whenever it is (re)provisioned, so this only has to get the slice back:
#   ACTIVE / READY                      make sure every worker trains (all or none), with the
#                                       run saved in the workdir
#   FAILED / SUSPENDED / PREEMPTED ...  delete it and create it again (with --wait: until ACTIVE)
#   MISSING                             create it
#   WAITING_FOR_RESOURCES / ...         nothing (with --wait: wait, at most --valid-until)
# Training continues from the last checkpoint in the gs:// workdir. --watch=SECONDS checks again
# every SECONDS (optional: run it in tmux on a small VM or your workstation); a failed check
# (gcloud or ssh error, a re-created slice that failed) is retried after a growing pause, and
# --max-failures (10) failures in a row end it. Trainer flags after -- must match the saved run.
#
#   launch/tpu/resume.sh --watch=600

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
need_workdir

check_once() {
  local state
  state=$(tpu_state)
  echo "$NAME: $state" >&2
  case $state in
    ACTIVE | READY)
      do_train saved-only
      ;;
    FAILED | SUSPENDED | SUSPENDING | PREEMPTED | TERMINATED | STOPPED)
      do_delete
      do_create  # the startup script installs and trains on every worker
      ;;
    MISSING)
      do_create
      ;;
    *)  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, ...
      if [[ $WAIT == 1 ]]; then wait_active; fi
      ;;
  esac
}

if [[ $WATCH_S == 0 || $DRY_RUN == 1 ]]; then
  check_once
  exit 0
fi
failures=0
while true; do
  # In a subshell with errexit: an error ends this check, not the watch.
  set +e
  (
    set -e
    check_once
  )
  rc=$?
  set -e
  if ((rc == 0)); then
    failures=0
    pause=$WATCH_S
  else
    failures=$((failures + 1))
    if ((failures >= MAX_FAILURES)); then
      echo "error: $failures checks in a row failed; stopping the watch" >&2
      exit 1
    fi
    pause=$((POLL_S * 2 ** (failures - 1)))
    if ((pause > WATCH_S)); then pause=$WATCH_S; fi
    echo "check failed ($failures in a row); next try in $pause s" >&2
  fi
  sleep "$pause"
done
