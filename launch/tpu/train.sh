#!/usr/bin/env bash
# Starts `python -m signclip_jax.train --config=CONFIG --workdir=gs://... FLAGS` on every worker
# at once, detached, each logging to /opt/signclip/logs/train.log on its worker. At the first
# start the run (worker options and trainer flags) is saved in WORKDIR/launch/run.args: the
# startup script of a re-created slice and resume.sh start exactly that run again, and a
# train.sh with other flags for the same workdir is refused. With --data, each worker first
# copies the splits it reads (train, val) of that gs:// folder to its disk (or mounts it,
# --data-mode=fuse), in the detached part, and the trainer reads them
# (data.source=packed, data.shards=.../{split}). The compilation cache defaults to
# gs://BUCKET/jax_cache. Restarts are all workers or none: when only some workers train, all
# are stopped and started together. Flags after -- go to the trainer. Training resumes by
# itself from the checkpoints in the workdir.
#
#   launch/tpu/train.sh --data=gs://my-bucket/packed -- --config.model.dtype=bfloat16

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_train
