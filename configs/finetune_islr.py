r"""Fine-tunes a trained SignCLIP on an isolated-sign (ISLR) dataset, from a checkpoint.

The model's architecture and tokenizer come from the run named by `init_from` (a workdir, a
checkpoint step directory, or a `convert from-pytorch` output), so a Spreadthesign run or a
released PyTorch checkpoint can be fine-tuned offline. Prompts are "<en> <ase> {gloss}"
(the original's `sp_universal_tagging`), glosses cleaned as the original's ISLR loaders.

  # a tfds dataset prepared as array_record (no TensorFlow needed to read it):
  python -m signclip_jax.train --config=configs/finetune_islr.py:dataset=asl_citizen \
      --config.init_from=runs/spreadthesign --config.data.data_dir=/data/tfds \
      --workdir=runs/ft_asl_citizen
  # any manifest (CSV/JSONL: pose, text, optional split, sign_language, label):
  python -m signclip_jax.train --config=configs/finetune_islr.py:dataset=manifest \
      --config.init_from=runs/spreadthesign/checkpoints/250000 \
      --config.data.manifest=/data/my_signs.csv --workdir=runs/ft_mine

Args: dataset (asl_citizen | sem_lex | asl_signs | manifest), batch_size, epochs.
"""

from signclip_jax.config import base_config, parse_arg

# tfds names as registered by sign-language-datasets; gloss clean-up as the original's
# ISLR loaders (reference 2.3).
DATASETS = {
    "asl_citizen": dict(source="tfds", tfds_name="asl_citizen", gloss_style="asl_citizen"),
    "sem_lex": dict(source="tfds", tfds_name="sem_lex", gloss_style="sem_lex"),
    "asl_signs": dict(source="tfds", tfds_name="asl_signs", gloss_style="none"),
    "manifest": dict(source="manifest", gloss_style="none"),
}


def get_config(arg=None):
    arg = parse_arg(arg, dataset="manifest", batch_size=256, epochs=10)
    if arg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {arg.dataset!r}")
    c = base_config()
    c.batch_size = arg.batch_size
    c.num_epochs = arg.epochs
    c.init_from = ""  # required: the pretrained run (workdir or checkpoint step directory)
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.model.pretrained = False  # the weights come from init_from

    preset = DATASETS[arg.dataset]
    c.data.source = preset["source"]
    c.data.tfds_name = preset.get("tfds_name", "")
    c.data.gloss_style = preset["gloss_style"]
    c.data.prompt_template = "isolated"  # "<en> <{sign_language}> {gloss}"
    c.data.sign_language = "ase"  # records without a sign language
    c.data.length_buckets = (64, 128, 192)  # ISLR clips are short; same numerics as 256

    # A shorter schedule than pretraining: warm-up then linear decay over this run.
    c.optimizer.lr = 2e-5
    c.optimizer.warmup_steps = 200
    c.optimizer.decay_steps = 0  # 0: decay to end_lr over the run's own length
    return c
