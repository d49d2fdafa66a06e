"""signclip-jax: SignCLIP (text <-> sign-language pose) in JAX/Flax NNX.

`load(REF)` gives a model ready to embed (signclip_jax/models.py): REF is a run directory, a
release folder or hf-hub:ORG/NAME, e.g. `model = signclip_jax.load("hf-hub:ORG/NAME")`, then
`model.embed_poses(["sign.pose"])` [N, H] and `model.embed_texts(["<en> <ase> house"])` [M, H].
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0.dev0"


def load(
    ref: str | os.PathLike,
    *,
    which: str = "latest",
    dtype: str | None = None,
    batch_size: int = 64,
) -> Any:
    """The model `ref` names, ready to embed (signclip_jax.models.Model): a run directory, a
    step directory, a release folder or hf-hub:ORG/NAME[@REVISION] (see signclip_jax.models).

    `dtype` overrides the compute dtype (e.g. "bfloat16"); `which` picks a run's latest or
    best checkpoint; `batch_size` is the most rows per model call.
    """
    from signclip_jax import models  # JAX and the rest only when a model is loaded

    return models.load(ref, which=which, dtype=dtype, batch_size=batch_size)


__all__ = ["__version__", "load"]
