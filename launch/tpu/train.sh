#!/usr/bin/env bash
# Starts `python -m signclip_jax.train --config=CONFIG --workdir=gs://...` on every worker at
# once, detached (nohup), each logging to ~/signclip-logs/train.log on its worker. With --data,
# each worker first copies that gs:// folder to /tmp/signclip-data. Flags after -- go to the
# trainer. Safe to repeat: a worker where training runs already is left alone. Training
# resumes by itself from the checkpoints in the workdir.
#
#   launch/tpu/train.sh --project=my-proj --bucket=my-bucket --data=gs://my-bucket/packed -- \
#       --config.data.source=packed --config.data.shards=/tmp/signclip-data/train

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_train
