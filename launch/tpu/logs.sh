#!/usr/bin/env bash
# Streams the training log of one worker (--worker=0 by default: process 0 prints the progress
# and metrics; --worker=all for every worker). --no-follow prints the last --lines and exits.
#
#   launch/tpu/logs.sh --lines=200

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_logs
