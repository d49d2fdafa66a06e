r"""Packs a data source into ArrayRecord shards: `python -m signclip_jax.prepare --out=DIR ...`.

The command line only: the packing itself (record format, shards written atomically, index.json
last, skipped.txt) is `signclip_jax.data.packing.pack`. Read the result with
data.source='packed', data.shards=DIR.

  python -m signclip_jax.prepare --source=spreadthesign --csv=SperadTheSign.csv \
      --pose_dir=poses --split=train --out=packed/train --workers=8
  python -m signclip_jax.prepare --config=configs/spreadthesign.py --split=test --out=packed/test

With --text_model it stages a text model instead: the tokenizer, config.json and weights of a
hub name (or folder) copied into --out (a shared folder or gs://), so that runs on machines
without internet load it from there (model.text_model=OUT, HF_HUB_OFFLINE=1):

  python -m signclip_jax.prepare --text_model=bert-base-cased --out=gs://BUCKET/models/bert-base-cased
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import ml_collections

from signclip_jax import cli, files
from signclip_jax import config as config_lib
from signclip_jax.errors import UserError

log = logging.getLogger("signclip_jax.prepare")

SOURCES = ("spreadthesign", "manifest", "tfds", "sld", "synthetic")


def _data_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    if args.config:
        config = config_lib.load_config_file(args.config)
        data = ml_collections.ConfigDict(config.data.to_dict())
    else:
        data = ml_collections.ConfigDict()
        data.source = "spreadthesign"
    overrides = {
        "source": args.source,
        "csv_path": args.csv,
        "pose_dir": args.pose_dir,
        "manifest": args.manifest,
        "tfds_name": args.tfds_name,
        "data_dir": args.data_dir,
        "split_dir": args.split_dir,
        "synthetic_dir": args.synthetic_dir,
        "pose_components": args.components,
        "pose_header": args.pose_header,
    }
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    if args.languages is not None:
        data.languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    if data.get("source") == "packed":
        raise UserError("--source=packed: the data is packed already")
    return data


# Settings that only packing reads: an error with --text_model, which stages a model instead.
_PACKING_ONLY = (
    "config", "source", "csv", "pose_dir", "manifest", "tfds_name", "data_dir", "pose_header",
    "synthetic_dir", "split_dir", "languages", "components",
)  # fmt: skip


def stage_text_model(name_or_path: str, out: str) -> list[str]:
    """Copies the text model `name_or_path` (hub name, folder or the bundled alias) into the
    folder `out` (local or gs://): the tokenizer's files, config.json and the weights
    (model.safetensors, sharded with its index, or pytorch_model.bin). Returns the file names.

    Needs the hub once (or the model in the local cache); every later load from `out` needs
    no hub: model.text_model=OUT with HF_HUB_OFFLINE=1.
    """
    # Imported here: transformers and the model code are slow to import.
    from signclip_jax.data import text
    from signclip_jax.model import bert

    path = text.resolve_text_model(name_or_path)
    tokenizer = text.load_tokenizer(path)
    local = text.is_local(path)

    def one(filename: str) -> str | None:
        if local:
            found = os.path.join(path, filename)
            return found if os.path.isfile(found) else None
        return text.hub_file(path, filename)

    sources = {}
    config_file = one("config.json")
    if config_file is None:
        raise UserError(f"text model {name_or_path!r} has no config.json")
    sources["config.json"] = config_file
    weights = bert.checkpoint_files(path)
    if len(weights) > 1:  # sharded safetensors: the shards and their index
        sources["model.safetensors.index.json"] = one("model.safetensors.index.json")
    sources.update({os.path.basename(w): w for w in weights})
    target = files.as_path(out)
    if not files.is_remote(out):
        target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scj-stage-") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            sources.setdefault(name, os.path.join(tmp, name))
        for name, src in sorted(sources.items()):
            log.info("staging %s", name)
            files.write_bytes_atomic(target / name, Path(src).read_bytes())
    return sorted(sources)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.prepare",
        description=(
            "Pack a data source (Spreadthesign CSV + poses, manifest, tfds, synthetic) into "
            "ArrayRecord shards that data.source='packed' reads. Unusable examples are "
            "skipped and listed in OUT/skipped.txt."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (one split per folder)")
    p.add_argument(
        "--text_model",
        help="stage this text model (hub name or folder: tokenizer, config.json, weights) into "
        "--out instead of packing data, for runs without internet (model.text_model=OUT)",
    )
    p.add_argument(
        "--config", help="training config file (CONFIG.py[:arg]); its data.* settings are used"
    )
    p.add_argument("--source", choices=SOURCES, help="data source (overrides the config's)")
    p.add_argument("--csv", help="Spreadthesign metadata CSV (data.csv_path)")
    p.add_argument("--pose_dir", help="folder of .pose files (data.pose_dir)")
    p.add_argument("--manifest", help="manifest CSV or JSONL (data.manifest)")
    p.add_argument("--tfds_name", help="tfds dataset name or builder folder (data.tfds_name)")
    p.add_argument("--data_dir", help="tfds data_dir (data.data_dir)")
    p.add_argument("--pose_header", help=".pose/.poseheader giving the layout of tfds pose arrays")
    p.add_argument("--synthetic_dir", help="folder of the synthetic dataset (data.synthetic_dir)")
    p.add_argument("--split", default="train", help="train, val, test or all")
    p.add_argument("--split_dir", help="folder with {train,val,test}.txt row ids")
    p.add_argument(
        "--languages", help="comma-separated spoken languages to keep (default en; '' keeps all)"
    )
    p.add_argument("--components", help="pose components (data.pose_components)")
    p.add_argument("--shard_size", type=int, default=2000, help="records per shard")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: in-process)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="storage dtype of the points (float32 is bit-exact)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace packed data in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.text_model is not None:
        given = [f"--{k}" for k in _PACKING_ONLY if getattr(args, k) is not None]
        if given:
            raise UserError(f"--text_model stages a text model into --out; drop {', '.join(given)}")
        names = stage_text_model(args.text_model, args.out)
        print(
            f"staged text model {args.text_model} into {args.out} ({', '.join(names)}); "
            f"train with --config.model.text_model={args.out} (the hub may be offline)"
        )
        return 0
    # Only now: the data pipeline imports JAX, and --help and usage errors stay instant.
    from signclip_jax.data import packing, pipeline, sources

    data = _data_config(args)
    spec = pipeline.settings_from_config(data).spec
    spec = type(spec)(components=spec.components, include_z=spec.include_z, max_frames=0)
    source = sources.make_source(data, split=args.split)
    log.info("packing %s into %s", source, args.out)
    index = packing.pack(
        source,
        args.out,
        spec=spec,
        dtype=args.dtype,
        shard_size=args.shard_size,
        workers=args.workers,
        overwrite=args.overwrite,
        description={
            "source": str(data.get("source")),
            "split": sources.normalize_split(args.split),
            "repr": repr(source),
        },
    )
    print(
        f"packed {index['num_records']} examples into {len(index['shards'])} shard(s) in "
        f"{args.out} ({index['dtype']}); skipped {index['skipped']} "
        f"(listed in {Path(args.out) / 'skipped.txt'})"
    )
    return 0
