r"""SignCLIP pretraining on Spreadthesign: the original baseline_temporal recipe.

bert-base-cased for both towers, 12 pose layers, 609-d reduced-face poses, 256 frames,
batch 448, Adam lr 5e-5 betas (0.9, 0.98), 1000 warm-up updates then polynomial decay to
1e6 updates, clip 2.0, 25 epochs, temporal augmentation, the original `signclip` loss.

  python -m signclip_jax.train --config=configs/spreadthesign.py --workdir=gs://BUCKET/runs/st \
      --config.data.csv_path=/data/SperadTheSign.csv --config.data.pose_dir=/data/poses

`:runlocal` makes a tiny smoke-test version (small batch, few steps).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_config

from signclip_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, batch_size=448)
    c = base_config()
    c.batch_size = arg.batch_size
    if arg.runlocal:
        c.batch_size = 8
        c.total_steps = 3
        c.log_every_steps = 1
        c.eval_every_steps = 3
        c.checkpoint_every_steps = 3
        c.data.workers = 0
    return c
