#!/usr/bin/env bash
# Stops training on every worker with SIGTERM: the trainer saves a checkpoint and exits.
# The slice keeps running (and costing) and its startup script starts the run again at the
# next reboot or re-provisioning: delete.sh removes it.
#
#   launch/tpu/stop.sh

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_stop
