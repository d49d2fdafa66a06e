"""The training config a benchmark runs (train and lengths modes).

In this order: the config file (--config; default the original recipe, base_config()), the
--bert shortcut, the --config.KEY=VALUE and --set KEY=VALUE overrides (cli.py collects both
into args.overrides), then the dedicated flags (batch size, dtype, attention, remat, ...).
"""

from __future__ import annotations

import argparse

import ml_collections

from signclip_jax import config as config_lib
from signclip_jax.model.bert import PRESETS, TINY_BERT, BertConfig

# Model keys a config file may lack but `--config.KEY=` may set (model.model_config reads them).
OPTIONAL_KEYS = (
    "model.bert", "model.hidden_dropout", "model.attention_dropout", "model.cls_token_id",
    "model.sep_token_id", "model.max_frames",
)  # fmt: skip


def train_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The training config the benchmark runs: the file, then --bert, then --config.* and
    --set overrides, then the dedicated flags (batch size, dtype, attention, remat, ...)."""
    # No --config: the original recipe (configs/spreadthesign.py without an argument).
    config = config_lib.load_config_file(args.config) if args.config else config_lib.base_config()
    if args.bert:
        if args.bert == "tiny":
            bert, text_model = dict(TINY_BERT), "minilm"
            # MiniLM's [CLS]/[SEP] ids, set here so that no tokenizer is loaded.
            config.model.cls_token_id, config.model.sep_token_id = 101, 102
        elif args.bert == "minilm":
            bert, text_model = BertConfig.from_hf("minilm").to_dict(), "minilm"
        else:
            bert, text_model = PRESETS[args.bert].to_dict(), args.bert
        config.model.bert = bert
        config.model.text_model = text_model
        # The video tower takes the first layers of this BERT: at most all of them.
        config.model.video_layers = min(config.model.video_layers, bert["num_hidden_layers"])
    config = config_lib.apply_overrides(
        config, [f"{key}={raw}" for key, raw in args.overrides], new_keys=OPTIONAL_KEYS
    )
    flags = {
        "batch_size": args.batch_size,
        "microbatches": args.microbatches,
        "model.dtype": args.dtype,
        "model.attention": args.attention,
        "model.remat": True if args.remat else None,
        "seed": args.seed,
    }
    for key, value in flags.items():
        if value is not None:
            section, _, leaf = key.rpartition(".")
            (config[section] if section else config)[leaf] = value
    config.model.pretrained = False  # random init: a benchmark needs no weights
    return config
