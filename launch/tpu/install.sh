#!/usr/bin/env bash
# Installs the project on every worker of the slice (--worker=all): the code, either
# `git clone` of --repo at --ref or a tarball of this checkout (tracked and untracked files,
# nothing git ignores) copied with `gcloud compute tpus tpu-vm scp`, then
# launch/setup_env.sh --accelerator=tpu: a Python 3.11 venv in ~/signclip-venv with
# requirements.txt, jax[tpu] at the version requirements.txt pins (libtpu from PyPI) and gcsfs.
#
#   launch/tpu/install.sh --project=my-proj                      # this tree
#   launch/tpu/install.sh --project=my-proj --repo=https://github.com/ORG/signclip-jax --ref=v0.1

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_install
