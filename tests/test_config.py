"""signclip_jax.config: typed config arguments and --config.KEY=VALUE overrides."""

import ml_collections
import pytest

from signclip_jax import config as config_lib
from signclip_jax.errors import UserError


def test_parse_arg_types_and_errors():
    arg = config_lib.parse_arg("steps=5,tiny,name=x", steps=1, tiny=False, name="y", lr=0.5)
    assert (arg.steps, arg.tiny, arg.name, arg.lr) == (5, True, "x", 0.5)
    with pytest.raises(UserError, match="unknown config argument"):
        config_lib.parse_arg("nope=1", steps=1)
    with pytest.raises(UserError, match="not a int"):
        config_lib.parse_arg("steps=many", steps=1)


def _config():
    c = ml_collections.ConfigDict()
    c.batch_size = 8
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.max_frames = 96
    c.data.val_fraction = 0.2
    c.data.include_z = True
    c.data.languages = ["en"]
    c.data.manifest = ""
    return c


def test_overrides_keep_types_and_allow_new_data_keys():
    c = _config()
    out = config_lib.apply_overrides(
        c,
        [
            "data.source=manifest",
            "data.manifest=/x/m.csv",
            "data.max_frames=64",
            "data.val_fraction=0.5",
            "data.include_z=false",
            "data.languages=en,de",
            "data.pose_header=/h.poseheader",
            "batch_size=16",
        ],
    )
    assert out.data.source == "manifest" and out.data.manifest == "/x/m.csv"
    assert out.data.max_frames == 64 and isinstance(out.data.max_frames, int)
    assert out.data.val_fraction == 0.5 and out.data.include_z is False
    assert list(out.data.languages) == ["en", "de"]
    assert out.data.pose_header == "/h.poseheader"  # a new optional key
    assert c.data.source == "synthetic"  # the input is not modified
    for bad, match in (
        ("data.max_frames=lots", "not a int"),
        ("data.include_z=maybe", "not a boolean"),
        ("nosuch.key=1", "nosuch is not in the config"),
        ("data=1", "is a group"),
        ("data.max_frames", "expected --config.KEY=VALUE"),
    ):
        with pytest.raises(UserError, match=match):
            config_lib.apply_overrides(c, [bad])


def test_overrides_without_new_keys():
    c = _config()
    with pytest.raises(UserError, match="unknown key"):
        config_lib.apply_overrides(c, ["data.pose_header=/h"], new_keys=False)
    assert config_lib.apply_overrides(c, ["batch_size=4"], new_keys=False).batch_size == 4


def test_spreadthesign_fast_variant():
    from signclip_jax.data import pipeline
    from tests.helpers import load_config

    original, fast = load_config("spreadthesign"), load_config("spreadthesign", "fast")
    assert original.model.dtype == "float32" and original.data.length_buckets == ()
    assert original.data.length_group_batches == 0
    assert pipeline.settings_from_config(original).pose_dtype == "float32"
    assert fast.model.dtype == "bfloat16" and fast.model.attention == "auto"
    settings = pipeline.settings_from_config(fast)  # valid: buckets with grouping
    assert settings.lengths == (62, 94, 126, 158, 190, 222, 256)  # + 2 tokens: x32
    assert settings.length_group_batches == 32 and settings.pose_dtype == "bfloat16"
    assert fast.batch_size == original.batch_size == 448
