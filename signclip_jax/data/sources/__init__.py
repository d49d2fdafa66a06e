"""Random-access data sources: `len(source)` and `source[i] -> record dict`.

Every source is picklable (grain worker processes unpickle it) and cheap to index: nothing
heavy happens in `__getitem__` except reading one record. Pose decoding happens later, in
the pipeline (`pipeline.load_pose_array`), so that a bad file is a counted skip there.

A record is a dict with
  "id"               str   stable name of the example (CSV row index, manifest id, ...)
  one pose entry:    "pose_path" str | "pose_bytes" bytes (an encoded .pose file)
                     | "pose" pose_format.Pose (tfds examples that carry the arrays)
                     | "points" [T, P, 3] float32 + "observed" [T, P] bool + "fps" (packed
                       shards: the normalised PoseArray, so augmentation still works)
                     | "features" [T, D] float32 (precomputed features; no augmentation)
  "text"             str   raw caption (not yet a prompt)
  "sign_language"    str   e.g. "ase"
  "spoken_language"  str   e.g. "en"
  "label"            int   class id, -1 if none
  "signer"           str   "" if none
and, for a row that could not be parsed, "error": str (the pipeline counts it as skipped).

Rows dropped while a source is built (malformed CSV/JSONL lines) are listed in
`source.skipped` as (name, reason) pairs, so the pipeline can count them with the rest.

One module per source: spreadthesign (metadata CSV + pose folder), manifest (CSV / JSONL),
packed (ArrayRecord shards from `prepare`), tfds (tfds and sign-language-datasets; the
`tfds` / `sld` extras), synthetic (generated, read as Spreadthesign); common holds the
record dict and split names. `make_source` picks one from `config.data.source`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from signclip_jax import config as config_lib
from signclip_jax import files
from signclip_jax.data.sources.common import SPLITS, make_record, normalize_split
from signclip_jax.data.sources.manifest import ManifestSource
from signclip_jax.data.sources.packed import (
    PACKED_FORMAT,
    PACKED_INDEX,
    PACKED_MAGIC,
    PACKED_VERSION,
    PackedSource,
    decode_packed,
    encode_packed,
)
from signclip_jax.data.sources.spreadthesign import (
    PANDAS_NA_STRINGS,
    SPREADTHESIGN_COLUMNS,
    SpreadthesignSource,
    generate_split_ids,
    read_split_file,
)
from signclip_jax.data.sources.synthetic import ensure_synthetic
from signclip_jax.data.sources.tfds import (
    SignLanguageDatasetsSource,
    TfdsSource,
    default_holistic_header,
    example_to_record,
)
from signclip_jax.errors import UserError

log = logging.getLogger(__name__)


def make_source(config, *, split: str | None = None, workdir: str | None = None):
    """Source for `config.data` (an ml_collections ConfigDict, or the whole config).

    data.source: spreadthesign (csv_path, pose_dir, split_dir, split_seed, val_fraction,
    test_fraction, languages) | manifest (manifest) | tfds (tfds_name, data_dir, pose_header)
    | sld (tfds_name, data_dir) | packed (shards; a "{split}" in it becomes the split name)
    | synthetic (synthetic_dir, synthetic_signs, synthetic_signers, synthetic_seed,
    synthetic_sign_languages; generated there when absent, default folder
    `workdir/synthetic_data`, then read as spreadthesign). `split` defaults to
    data.split, else "train".
    """
    data = config_lib.section(config, "data")
    kind = str(config_lib.get(data, "source", "spreadthesign")).lower()
    split = normalize_split(split or config_lib.get(data, "split", "train"))

    def need(key: str) -> str:
        value = config_lib.get(data, key, "")
        if value in ("", None):
            raise UserError(f"data.source={kind!r} needs data.{key}")
        return str(value)

    languages = config_lib.get(data, "languages", ("en",))
    if isinstance(languages, str):
        languages = tuple(x for x in languages.split(",") if x)
    st_kwargs = dict(
        split=split,
        split_dir=config_lib.get(data, "split_dir", "") or None,
        split_seed=int(config_lib.get(data, "split_seed", 3407)),
        val_fraction=float(config_lib.get(data, "val_fraction", 0.001)),
        test_fraction=float(config_lib.get(data, "test_fraction", 0.001)),
        languages=tuple(languages) or None,
        drop_missing=bool(config_lib.get(data, "drop_missing", False)),
    )
    if kind == "spreadthesign":
        return SpreadthesignSource(need("csv_path"), need("pose_dir"), **st_kwargs)
    if kind == "synthetic":
        folder = config_lib.get(data, "synthetic_dir", "")
        if not folder:
            if not workdir or files.is_remote(workdir):
                raise UserError("data.source='synthetic' needs data.synthetic_dir")
            folder = os.path.join(str(workdir), "synthetic_data")
        csv_path = ensure_synthetic(
            folder,
            num_signs=int(config_lib.get(data, "synthetic_signs", 8)),
            signers=int(config_lib.get(data, "synthetic_signers", 6)),
            seed=int(config_lib.get(data, "synthetic_seed", 0)),
            sign_languages=tuple(config_lib.get(data, "synthetic_sign_languages", ())) or None,
        )
        return SpreadthesignSource(csv_path, Path(csv_path).parent / "poses", **st_kwargs)
    if kind == "manifest":
        return ManifestSource(need("manifest"), split=None if split == "all" else split)
    if kind == "packed":
        # "packed/{split}" names one folder per split (prepare each split separately).
        shards = need("shards")
        if "{split}" in shards:
            return PackedSource(shards.replace("{split}", split))
        if split != "train":
            log.warning("data.shards has no {split} placeholder: split %r reads %s", split, shards)
        return PackedSource(shards)
    if kind == "tfds":
        return TfdsSource(
            need("tfds_name"),
            split,
            config_lib.get(data, "data_dir", "") or None,
            pose_header=config_lib.get(data, "pose_header", "") or None,
        )
    if kind == "sld":
        return SignLanguageDatasetsSource(
            need("tfds_name"),
            split,
            config_lib.get(data, "data_dir", "") or None,
            pose_header=config_lib.get(data, "pose_header", "") or None,
        )
    raise UserError(
        f"unknown data.source {kind!r}; use spreadthesign, manifest, tfds, sld, packed or synthetic"
    )


__all__ = [
    "PACKED_FORMAT",
    "PACKED_INDEX",
    "PACKED_MAGIC",
    "PACKED_VERSION",
    "PANDAS_NA_STRINGS",
    "SPLITS",
    "SPREADTHESIGN_COLUMNS",
    "ManifestSource",
    "PackedSource",
    "SignLanguageDatasetsSource",
    "SpreadthesignSource",
    "TfdsSource",
    "decode_packed",
    "default_holistic_header",
    "encode_packed",
    "ensure_synthetic",
    "example_to_record",
    "generate_split_ids",
    "make_record",
    "make_source",
    "normalize_split",
    "read_split_file",
]
