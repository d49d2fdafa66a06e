"""data.source='synthetic': a generated Spreadthesign-style folder, made once and then read as
Spreadthesign (see signclip_jax/data/synthetic.py for the data itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from signclip_jax import files
from signclip_jax.data.synthetic import write_synthetic_dataset
from signclip_jax.errors import UserError


def ensure_synthetic(
    directory: str | os.PathLike,
    *,
    num_signs: int = 8,
    signers: int = 6,
    seed: int = 0,
    sign_languages: tuple[str, ...] | None = None,
) -> Path:
    """The metadata CSV of a synthetic dataset in `directory`, generated once.

    A marker file records the parameters: a folder made with other ones is an error rather
    than silently reused.
    """
    directory = Path(directory)
    params = {"num_signs": num_signs, "signers": signers, "seed": seed}
    extra = {}
    if sign_languages:  # only recorded when set, so older marker files stay valid
        params["sign_languages"] = list(sign_languages)
        extra["sign_languages"] = tuple(sign_languages)
    marker = directory / "synthetic.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("params") != params:
            raise UserError(
                f"{directory} holds a synthetic dataset made with {info.get('params')}, "
                f"not {params}: use another data.synthetic_dir"
            )
        return directory / info["csv"]
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = Path(
        write_synthetic_dataset(directory, num_signs=num_signs, signers=signers, seed=seed, **extra)
    )
    info = {"params": params, "csv": os.path.relpath(csv_path, directory)}
    files.write_json_atomic(marker, info)
    return csv_path
