#!/usr/bin/env bash
# Deletes the queued resource together with its TPU VM (--force), or with --direct the TPU VM.
# The gs:// workdir and data stay.
#
#   launch/tpu/delete.sh

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_delete
