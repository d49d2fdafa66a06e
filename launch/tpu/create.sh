#!/usr/bin/env bash
# Creates the TPU VM or pod slice. By default through a queued resource with spot capacity:
#   gcloud compute tpus queued-resources create NAME --node-id=NAME --accelerator-type=...
#       --runtime-version=... --spot
# --direct uses `gcloud compute tpus tpu-vm create` instead (blocks until READY).
# --wait polls the queued resource until it is ACTIVE (fails if it ends FAILED/SUSPENDED).
#
#   launch/tpu/create.sh --project=my-proj --zone=us-central2-b --accelerator=v4-32 --wait

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_create
