"""What the sources share: split names and the record dict."""

from __future__ import annotations

import pytest

from signclip_jax.data.sources import common
from signclip_jax.errors import UserError


@pytest.mark.parametrize(
    ("given", "want"),
    [("train", "train"), (" Validation ", "val"), ("valid", "val"), ("dev", "val"),
     ("TEST", "test"), ("all", "all")],
)  # fmt: skip
def test_normalize_split(given, want):
    assert common.normalize_split(given) == want


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match=r"unknown split 'dev2'; use one of train, val, test, all"):
        common.normalize_split("dev2")


def test_record_defaults_and_pose_entry():
    r = common.make_record("7", text="house", label="3", pose_path="/p/a.pose")
    assert r == {
        "id": "7", "text": "house", "sign_language": "", "spoken_language": "", "label": 3,
        "signer": "", "pose_path": "/p/a.pose",
    }  # fmt: skip
