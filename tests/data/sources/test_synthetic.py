"""data.source='synthetic': generated once in the workdir, then reused; other parameters are an
error rather than a silently reused folder."""

from __future__ import annotations

import pytest

from signclip_jax.data import sources
from signclip_jax.errors import UserError
from tests.data.sources.helpers import data_config


def test_make_source_synthetic_generates_once(tmp_path):
    cfg = data_config(source="synthetic", synthetic_signs=2, synthetic_signers=3, languages=("en",))
    src = sources.make_source(cfg, split="all", workdir=str(tmp_path))
    assert len(src) == 6
    marker = tmp_path / "synthetic_data" / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    again = sources.make_source(cfg, split="all", workdir=str(tmp_path))
    assert [again[i] for i in range(6)] == [src[i] for i in range(6)]
    assert marker.stat().st_mtime_ns == stamp
    cfg.data.synthetic_signs = 3
    with pytest.raises(UserError, match=r"another data\.synthetic_dir"):
        sources.make_source(cfg, split="all", workdir=str(tmp_path))
    with pytest.raises(UserError, match="synthetic_dir"):
        sources.make_source(data_config(source="synthetic"))
