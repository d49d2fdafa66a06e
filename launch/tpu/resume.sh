#!/usr/bin/env bash
# Brings a run back after a spot preemption. Looks at the slice's state:
#   ACTIVE / READY                      start training where it is not running (train.sh)
#   FAILED / SUSPENDED / PREEMPTED ...  delete it, create it again, wait, install, train
#   MISSING                             create, wait, install, train
#   WAITING_FOR_RESOURCES / ...         wait, then install and train
# Training continues from the last checkpoint in the gs:// workdir. --watch=SECONDS repeats
# the check forever (run it in tmux on a small VM or your workstation).
#
#   launch/tpu/resume.sh --project=my-proj --bucket=my-bucket --watch=600 -- --config.x=y

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
      do_train
      ;;
    FAILED | SUSPENDED | SUSPENDING | PREEMPTED | TERMINATED | STOPPED)
      do_delete
      WAIT=1 do_create
      do_install
      do_train
      ;;
    MISSING)
      WAIT=1 do_create
      do_install
      do_train
      ;;
    *)  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, ...
      WAIT=1 wait_active
      do_install
      do_train
      ;;
  esac
}

check_once
if [[ $WATCH_S != 0 && $DRY_RUN != 1 ]]; then
  while sleep "$WATCH_S"; do check_once; done
fi
