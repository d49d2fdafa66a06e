#!/usr/bin/env bash
# Installs the project on every worker of the slice now (a new slice does it by itself at boot,
# through its startup script; run this to update the code of a running slice). The code is a
# git fetch of --repo at --ref, or a tarball of this checkout (tracked and untracked files,
# nothing git ignores) put in the workdir (WORKDIR/launch/code.tar.gz) where every worker, and
# every re-created slice, finds it. Then on every worker, as root: launch/setup_env.sh
# --accelerator=tpu, a Python 3.11 venv in /opt/signclip/venv with requirements.txt, jax[tpu] at
# the version requirements.txt pins (libtpu from PyPI) and gcsfs. Training is not started.
#
#   launch/tpu/install.sh                      # this tree
#   launch/tpu/install.sh --repo=https://github.com/ORG/signclip-jax --ref=v0.1

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
need_project
do_install
