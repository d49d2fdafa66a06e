r"""SignCLIP pretraining on Spreadthesign: the original baseline_temporal recipe.

bert-base-cased for both towers, 12 pose layers, 609-d reduced-face poses, 256 frames,
batch 448, Adam lr 5e-5 betas (0.9, 0.98), 1000 warm-up updates then polynomial decay to
1e6 updates, clip 2.0, 25 epochs, temporal augmentation, the original `signclip` loss.

  python -m signclip_jax.train --config=configs/spreadthesign.py --workdir=gs://BUCKET/runs/st \
      --config.data.csv_path=/data/SperadTheSign.csv --config.data.pose_dir=/data/poses

`:runlocal` makes a tiny smoke-test version (small batch, few steps).

`:fast` trades exactness to the original for speed on GPUs/TPUs:
- bf16 compute (model.dtype; parameters stay float32, poses travel in bf16, which is exact);
- model.attention auto: cuDNN fused attention on GPUs (used where attention dropout is 0);
- length buckets every 32 frames with length grouping over windows of 32 batches. Batches
  then hold clips of similar length, so their in-batch negatives differ from the original's
  random batches. On the Spreadthesign length model this cuts the training FLOPs per clip
  from 173 to ~95 GFLOP (BENCHMARKS.md, "Length buckets"), at the price of one XLA compile
  per bucket (cached across runs by compilation_cache_dir). The buckets are 2 frames short
  of multiples of 32 because [CLS] and [SEP] join the frames: 126 frames make 128 tokens,
  one attention-kernel tile, where 128 frames would spill 2 tokens into a second one.

`:packed` packs several clips per row (data.packing) instead of padding each: the batches
stay the original's random ones and the embeddings and loss are the same as padded
(tests/train/test_packing.py); buckets and length grouping are then off. `:fast,packed`
combines it with bf16.
"""

from signclip_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, fast=False, packed=False, batch_size=448)
    c = base_config()
    c.batch_size = arg.batch_size
    if arg.fast:
        c.model.dtype = "bfloat16"
        c.model.attention = "auto"
        c.data.length_buckets = (62, 94, 126, 158, 190, 222)
        c.data.length_group_batches = 32
    if arg.packed:
        c.data.packing = True
        c.data.length_buckets = ()
        c.data.length_group_batches = 0
    if arg.runlocal:
        c.batch_size = 8
        c.total_steps = 3
        c.log_every_steps = 1
        c.eval_every_steps = 3
        c.checkpoint_every_steps = 3
        c.data.workers = 0
    return c
