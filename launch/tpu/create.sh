#!/usr/bin/env bash
# Creates the TPU VM or pod slice, by default through a queued resource with spot capacity:
#   gcloud compute tpus queued-resources create NAME --node-id=NAME --accelerator-type=...
#       --runtime-version=... --spot --valid-until-duration=24h
#       --metadata-from-file=startup-script=...
# The zone follows the accelerator (table below) unless --zone is given. The startup script
# (launch/tpu/startup.sh with the workdir written in) installs and starts training on every
# worker after each (re)provisioning. The workdir's bucket is created in the slice's region when
# it does not exist. The settings are recorded (~/.config/signclip-launch/NAME.env) and every
# other script of the run reads them: no --zone, --project, ... to repeat.
# --direct uses `gcloud compute tpus tpu-vm create` instead (blocks until READY).
# --wait polls the queued resource until it is ACTIVE (fails if it ends FAILED/SUSPENDED, or
# is not granted within --valid-until).
#
#   launch/tpu/create.sh --project=my-proj --bucket=my-bucket --accelerator=v6e-8 --wait

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CREATING=1
parse_args "$@"
need_project
if [[ -n $WORKDIR ]]; then
  need_workdir
  ensure_bucket
fi
wait_after=$WAIT
WAIT=0
do_create
save_record
if [[ $wait_after == 1 && $QUEUED == 1 ]]; then wait_active; fi
