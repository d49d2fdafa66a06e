"""tools/bench/overrides.py: the training config a benchmark runs."""

from __future__ import annotations

import pytest

from signclip_jax import config as config_lib
from signclip_jax.errors import UserError
from signclip_jax.tools.bench import cli, overrides
from tests.helpers import load_config


def test_config_overrides():
    config = config_lib.apply_overrides(
        load_config("spreadthesign"),
        ["data.length_buckets=(64,128)", "model.remat=true", "batch_size=32",
         "model.text_model=minilm", "model.hidden_dropout=0.0"],  # optional key, absent before
        new_keys=overrides.OPTIONAL_KEYS,
    )  # fmt: skip
    assert tuple(config.data.length_buckets) == (64, 128) and config.model.remat is True
    assert config.batch_size == 32 and config.model.text_model == "minilm"
    assert config.model.hidden_dropout == 0.0
    for key, raw in (("model.nope", "1"), ("nope.x", "1"), ("batch_size", "x"),
                     ("model.remat", "maybe")):  # fmt: skip
        with pytest.raises(UserError, match=key.split(".")[0]):
            config_lib.apply_overrides(config, [f"{key}={raw}"], new_keys=overrides.OPTIONAL_KEYS)


def test_train_config_order():
    """The file (here the original recipe), --bert, the overrides, then the flags."""
    args = cli.build_parser().parse_args(["train", "--bert=tiny", "--batch_size=16"])
    args.overrides = [("batch_size", "8"), ("model.video_layers", "1"), ("seed", "3")]
    config = overrides.train_config(args)
    assert config.model.text_model == "minilm" and config.model.bert["hidden_size"] == 32
    assert (config.model.cls_token_id, config.model.sep_token_id) == (101, 102)
    assert config.model.video_layers == 1 and config.seed == 3
    assert config.batch_size == 16  # the flag wins over the override
    assert config.model.pretrained is False
