#!/usr/bin/env bash
# CI: the package as a user gets it (not the editable checkout).
#   1. Build the sdist and the wheel from the checkout's files (tracked and not ignored).
#   2. Core install (no extras): resolve it with pip --dry-run and fail when it would pull an
#      optional package (torch, flask, gcsfs, ...): .ci/core_install_check.py.
#   3. pip install the wheel with [demo,torch] (not editable) into a fresh venv, constrained by
#      requirements.txt's pins (CPU torch 2.13.0), then from a folder outside the checkout:
#      train 2 steps of the demo, convert the run to the original's PyTorch checkpoint, embed
#      a pose and a text with `python -m signclip_jax.embed` and with the `signclip-jax`
#      console script, and check the npz.
# Needs `build` (requirements-dev.txt) in the python that runs it: .ci/run calls it from its
# venv. Leaves nothing in the checkout; the scratch folder under /tmp goes on exit.
set -euo pipefail

checkout=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d /tmp/signclip-installed.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
started=$SECONDS

step() {
  echo "== installed package: $* ($((SECONDS - started)) s)"
}

step "building the sdist and wheel"
# From a copy of the checkout's files, so that no stale build/ or egg-info of the checkout
# reaches the wheel and the checkout stays as it is. The wheel is built from the sdist.
mkdir "$scratch/src"
git -C "$checkout" ls-files -z --cached --others --exclude-standard >"$scratch/files"
python - "$checkout" "$scratch/src" "$scratch/files" <<'EOF'
import os, shutil, sys

src, dst, listing = sys.argv[1:]
with open(listing, "rb") as f:
    names = [os.fsdecode(n) for n in f.read().split(b"\0") if n]
for name in names:
    if os.path.isfile(os.path.join(src, name)):  # deleted in the work tree: not shipped
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
EOF
python -m build -q --outdir "$scratch/dist" "$scratch/src" >"$scratch/build.log" 2>&1 ||
  { cat "$scratch/build.log"; exit 1; }
wheels=("$scratch"/dist/*.whl)
[[ ${#wheels[@]} == 1 && -f ${wheels[0]} ]] || { echo "error: no single wheel in dist/" >&2; exit 1; }
wheel=${wheels[0]}
echo "built $(basename "$wheel")"

# requirements.txt as pip constraints: no -e line, no extras (pip refuses both there).
sed -e '/^-e /d' -e 's/^\([A-Za-z0-9_.-]*\)\[[^]]*\]/\1/' "$checkout/requirements.txt" \
  >"$scratch/constraints.txt"

step "core install resolves without optional packages"
python -m pip install -q --dry-run --ignore-installed --report "$scratch/core.json" \
  -c "$scratch/constraints.txt" "$wheel" 2> >(grep -v "is ignored: it is neither" >&2)
python "$checkout/.ci/core_install_check.py" "$scratch/core.json"

step "installing the wheel with [demo,torch] into a fresh venv"
venv=$scratch/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
"$venv/bin/python" -m pip install -q -c "$scratch/constraints.txt" "${wheel}[demo,torch]" \
  2> >(grep -v "is ignored: it is neither" >&2)

# Everything below runs from outside the checkout, with the venv's commands first on PATH.
run=$scratch/run
mkdir "$run"
cd "$run"
export PATH="$venv/bin:$PATH"
unset PYTHONPATH
python - "$venv" "$checkout" <<'EOF'
import pathlib, sys

import signclip_jax

venv, checkout = (pathlib.Path(p).resolve() for p in sys.argv[1:])
where = pathlib.Path(signclip_jax.__file__).resolve().parent
assert where.is_relative_to(venv), f"signclip_jax imported from {where}, not from {venv}"
# Package data: every .txt file inside the package (the video requirements) is installed.
for f in (checkout / "signclip_jax").rglob("*.txt"):
    rel = f.relative_to(checkout / "signclip_jax")
    assert (where / rel).is_file(), f"{rel} is not in the installed package"
print("signclip_jax from", where)
EOF
torch_pin=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$scratch/constraints.txt")
python -c "import sys, torch; print('torch', torch.__version__)
sys.exit(torch.__version__.split('+')[0] != sys.argv[1])" "$torch_pin"

step "training 2 steps of the demo"
python -m signclip_jax.train --config="$checkout/configs/demo.py:tiny" --workdir=W \
  --config.total_steps=2 >"$scratch/train.log" 2>&1 || { tail -n 40 "$scratch/train.log"; exit 1; }
grep -q '"step": 2' W/metrics.jsonl || { echo "error: no step 2 in W/metrics.jsonl" >&2; exit 1; }

step "converting the run to PyTorch (mmpt)"
python -m signclip_jax.convert to-pytorch --workdir=W --format=mmpt --out=W/m.pt
test -s W/m.pt

step "embedding a pose and a text"
pose=$(find W/synthetic_data -name '*.pose' | sort | head -n 1)
[[ -n $pose ]] || { echo "error: no .pose under W/synthetic_data" >&2; exit 1; }
python -m signclip_jax.embed --workdir=W --poses "$pose" --texts "house" --out=W/e.npz
signclip-jax embed --workdir=W --poses "$pose" --texts "house" --out=W/e2.npz
python - <<'EOF'
import numpy as np
import torch

with np.load("W/e.npz") as e, np.load("W/e2.npz") as e2:
    pose, text = e["pose_embeddings"], e["text_embeddings"]
    assert pose.dtype == text.dtype == np.float32, (pose.dtype, text.dtype)
    assert pose.shape[0] == 1 and text.shape[0] == 1 and pose.shape[1] == text.shape[1] > 0
    assert np.isfinite(pose).all() and np.isfinite(text).all()
    # The console script runs exactly `python -m signclip_jax.embed`.
    assert np.array_equal(pose, e2["pose_embeddings"])
    assert np.array_equal(text, e2["text_embeddings"])
ckpt = torch.load("W/m.pt", map_location="cpu", weights_only=False)
assert ckpt["model"], "empty state_dict in W/m.pt"
print(f"embeddings {pose.shape} + {text.shape}; W/m.pt holds {len(ckpt['model'])} tensors")
EOF

step "passed"
