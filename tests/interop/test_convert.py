"""Checkpoint converter: Orbax <-> mmpt / release folder round trips, the original's key set,
importing original-style fairseq checkpoints, the PyTorch twin without JAX, CLI errors."""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from signclip_jax import run as run_lib
from signclip_jax.cli import run_cli
from signclip_jax.data import synthetic
from signclip_jax.errors import DataError, UserError
from signclip_jax.extras import MissingExtra
from signclip_jax.interop import convert, importer
from signclip_jax.interop.torch_twin import TorchSignCLIP, staged_output
from signclip_jax.model import signclip as signclip_model
from signclip_jax.model.bert import BertConfig
from signclip_jax.model.signclip import to_state_dict
from signclip_jax.serving import embedder as embedder_lib
from signclip_jax.train import losses, sharding
from tests.helpers import TINY_BERT, load_config

ROOT = Path(__file__).resolve().parents[2]
MAX_DIFF = 1e-4  # fp32 embeddings, JAX vs the PyTorch twin
PROMPTS = ["<en> <ase> house", "<de> <gsg> Haus", "<en> <bfi> SAD", "<fr> <fsl> maison"]


# --------------------------------------------------------------- the reference's key table
def reference_key_shapes(*, vocab, hidden, ffn, positions, types, video_layers, text_layers,
                         pose_dim):  # fmt: skip
    """Section 8.2 of the reference, written out from its tables (keys with shapes)."""
    h = hidden
    layer = {}
    for name in ("query", "key", "value"):
        layer[f"attention.self.{name}.weight"] = (h, h)
        layer[f"attention.self.{name}.bias"] = (h,)
    layer["attention.output.dense.weight"] = (h, h)
    layer["attention.output.dense.bias"] = (h,)
    layer["attention.output.LayerNorm.weight"] = (h,)
    layer["attention.output.LayerNorm.bias"] = (h,)
    layer["intermediate.dense.weight"] = (ffn, h)
    layer["intermediate.dense.bias"] = (ffn,)
    layer["output.dense.weight"] = (h, ffn)
    layer["output.dense.bias"] = (h,)
    layer["output.LayerNorm.weight"] = (h,)
    layer["output.LayerNorm.bias"] = (h,)
    assert len(layer) == 16

    def bert(prefix, n):
        out = {
            f"{prefix}embeddings.word_embeddings.weight": (vocab, h),
            f"{prefix}embeddings.position_embeddings.weight": (positions, h),
            f"{prefix}embeddings.token_type_embeddings.weight": (types, h),
            f"{prefix}embeddings.LayerNorm.weight": (h,),
            f"{prefix}embeddings.LayerNorm.bias": (h,),
            f"{prefix}pooler.dense.weight": (h, h),
            f"{prefix}pooler.dense.bias": (h,),
        }
        for i in range(n):
            out.update({f"{prefix}encoder.layer.{i}.{k}": s for k, s in layer.items()})
        return out

    keys = {
        "video_encoder.videomlp.linear1.weight": (h, pose_dim),
        "video_encoder.videomlp.linear1.bias": (h,),
        "video_encoder.videomlp.LayerNorm.weight": (h,),
        "video_encoder.videomlp.LayerNorm.bias": (h,),
        "video_encoder.videomlp.linear2.weight": (h, h),
        "video_encoder.videomlp.linear2.bias": (h,),
    }
    keys.update(bert("video_encoder.bert.", video_layers))
    keys.update(bert("text_encoder.", text_layers))
    return {"mmmodel." + k: v for k, v in keys.items()}


def test_mmpt_keys_of_baseline_temporal_are_the_originals():
    """Shape-only (nothing allocated): the bert-base-cased, 12 + 12 layer model."""
    expected = reference_key_shapes(vocab=28996, hidden=768, ffn=3072, positions=512, types=2,
                                    video_layers=12, text_layers=12, pose_dim=609)  # fmt: skip
    assert len(expected) == 404  # reference 8.2 key count
    config = load_config("spreadthesign")
    got = importer.mmpt_key_shapes(config, position_ids=True)
    ids = {k: got.pop(k) for k in list(got) if k not in expected}
    assert got == expected
    assert sum(int(np.prod(s)) for s in got.values()) == 217_681_152  # reference 1.8
    # transformers < 4.31 (the original's training environment) kept these buffers
    assert ids == {
        "mmmodel.video_encoder.bert.embeddings.position_ids": (1, 512),
        "mmmodel.text_encoder.embeddings.position_ids": (1, 512),
    }


# ------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def exports(tiny_workdir, tmp_path_factory):
    """The tiny workdir exported as mmpt (fp32, fp16 + position_ids) and as a release folder."""
    out = tmp_path_factory.mktemp("exports")
    common = ["to-pytorch", f"--workdir={tiny_workdir}"]
    assert convert.main([*common, "--format=mmpt", f"--out={out / 'fp32.pt'}"]) == 0
    assert convert.main([*common, "--format=mmpt", f"--out={out / 'fp16.pt'}", "--dtype=fp16",
                         "--position_ids"]) == 0  # fmt: skip
    assert convert.main([*common, "--format=hf", f"--out={out / 'release'}"]) == 0
    return out


@pytest.fixture(scope="module")
def run(tiny_workdir):
    return run_lib.load_run(tiny_workdir)


@pytest.fixture(scope="module")
def embedder(run):
    return embedder_lib.Embedder(run, batch_size=8)  # shared: each pose length compiles once


def test_mmpt_export_is_a_fairseq_dict_with_the_original_keys(exports, run):
    ckpt = torch.load(exports / "fp32.pt", weights_only=True)
    for key in ("args", "cfg", "model", "optimizer_history", "extra_state", "task_state"):
        assert key in ckpt, key
    history = ckpt["optimizer_history"][-1]
    assert history["criterion_name"] == "MMCriterion" and history["num_updates"] == run.step
    val_loss = ckpt["extra_state"]["val_loss"]  # the step was validated: a real number
    assert isinstance(val_loss, float) and history["lr_scheduler_state"]["best"] == val_loss
    assert ckpt["signclip_jax"]["model"] == run.model_config.to_dict()
    assert ckpt["extra_state"]["train_iterator"]["epoch"] == 1
    sd = ckpt["model"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == importer.mmpt_key_shapes(run.model_config)
    c = run.model_config
    assert {k: tuple(v.shape) for k, v in sd.items()} == reference_key_shapes(
        vocab=c.bert.vocab_size, hidden=c.hidden_size, ffn=c.bert.intermediate_size,
        positions=c.bert.max_position_embeddings, types=c.bert.type_vocab_size,
        video_layers=c.video_layers, text_layers=c.bert.num_hidden_layers, pose_dim=c.pose_dim,
    )  # fmt: skip
    assert all(v.dtype == torch.float32 for v in sd.values())
    # Linear weights in PyTorch layout [out, in]; strict load into a module of the original layout.
    np.testing.assert_array_equal(
        sd["mmmodel.video_encoder.videomlp.linear1.weight"].numpy(),
        np.asarray(run.model.video_encoder.videomlp.linear1.kernel[...]).T,
    )
    twin = TorchSignCLIP(c)
    twin.load_state_dict({k.removeprefix("mmmodel."): v for k, v in sd.items()}, strict=True)


def test_fp16_mmpt_export_has_position_ids_and_half_weights(exports, run):
    sd = torch.load(exports / "fp16.pt", weights_only=True)["model"]
    n = run.model_config.bert.max_position_embeddings
    for key in importer.position_id_keys():
        ids = sd.pop("mmmodel." + key)
        assert ids.dtype == torch.int64 and ids.tolist() == [list(range(n))]
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert set(sd) == set(importer.mmpt_key_shapes(run.model_config))


def _assert_same_params(run_a, run_b, *, fp16=False):
    a, b = to_state_dict(run_a.model), to_state_dict(run_b.model)
    assert a.keys() == b.keys()
    for key in a:
        want = a[key].astype(np.float16).astype(np.float32) if fp16 else a[key]
        np.testing.assert_array_equal(b[key], want, err_msg=key)
        assert b[key].dtype == np.float32
    assert jax.tree.map(float, run_a.loss_params) == jax.tree.map(float, run_b.loss_params)


@pytest.mark.parametrize("name", ["fp32.pt", "release", "fp16.pt"])
def test_round_trip_back_to_orbax_is_exact(exports, run, tmp_path, name):
    out = tmp_path / "imported"
    assert convert.main(["from-pytorch", f"--input={exports / name}", f"--out={out}"]) == 0
    back = run_lib.load_run(out)
    _assert_same_params(run, back, fp16=name == "fp16.pt")
    assert back.model_config == run.model_config
    assert back.settings.spec == run.settings.spec
    assert back.settings.text_max_len == run.settings.text_max_len
    for f in ("config.json", "model_config.json", "bert_config.json", "tokenizer"):
        assert (out / f).exists(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


# -------------------------------------------------------------- suspicious release folders
def _copy_release(exports: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(exports / "release", folder)
    return folder


def test_release_folder_with_integer_weights_is_refused(exports, tmp_path, capsys):
    folder = _copy_release(exports, tmp_path)
    file = folder / "model.safetensors"
    weights = load_file(str(file))
    key = "video_encoder.videomlp.linear1.bias"
    weights[key] = weights[key].round().to(torch.int32)
    save_file(weights, str(file), metadata={"format": "pt"})
    match = rf"{re.escape(str(file))}: {re.escape(key)} \(int32\) not floating point"
    with pytest.raises(DataError, match=match):
        convert.from_pytorch(folder, tmp_path / "o")
    with pytest.raises(DataError, match=match):
        TorchSignCLIP.from_pretrained(folder)
    with pytest.raises(SystemExit) as exit_:
        run_cli(
            lambda: convert.main(["from-pytorch", f"--input={folder}", f"--out={tmp_path / 'o'}"])
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and key in err[0] and "model.safetensors" in err[0], err
    assert not (tmp_path / "o").exists()

    # The same in an original-layout .pt: the key is named, nothing is written.
    ckpt = _fairseq_dict(_twin(video_layers=1), fp16=False, position_ids=True)
    bias = "mmmodel.text_encoder.pooler.dense.bias"
    ckpt["model"][bias] = ckpt["model"][bias].to(torch.int64)
    path = _save(tmp_path, ckpt)
    with pytest.raises(DataError, match=r"ckpt\.pt \(mmpt\): text_encoder\.pooler\.dense\.bias "
                       r"\(int64\) not floating point"):  # fmt: skip
        convert.from_pytorch(path, tmp_path / "o", **TINY)
    assert not (tmp_path / "o").exists()


def test_release_folder_without_tokenizer_uses_the_text_models(exports, run, tmp_path, caplog):
    folder = _copy_release(exports, tmp_path)
    for f in folder.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    out = tmp_path / "imported"
    with caplog.at_level(logging.WARNING):
        convert.from_pytorch(folder, out)
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder} has no tokenizer files (tokenizer.json / vocab.txt): using the tokenizer of "
        "text model 'minilm' instead"
    ]
    back = run_lib.load_run(out)
    assert back.tokenizer.get_vocab() == run.tokenizer.get_vocab()
    _assert_same_params(run, back)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        twin = TorchSignCLIP.from_pretrained(folder)
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder} has no tokenizer files (tokenizer.json / vocab.txt): using the tokenizer of "
        "its text model 'minilm' instead"
    ]
    with_tokenizer = TorchSignCLIP.from_pretrained(exports / "release")
    np.testing.assert_array_equal(twin.embed_texts(PROMPTS), with_tokenizer.embed_texts(PROMPTS))

    # No tokenizer to be had (offline, not cached): an error naming both, nothing written.
    with pytest.raises(UserError, match=r"has no tokenizer files.*'no-such-org/no-such-bert' "
                       "cannot be loaded"):  # fmt: skip
        convert.from_pytorch(folder, tmp_path / "o", text_model="no-such-org/no-such-bert")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- the twin, without JAX
def _pose_files(folder: Path) -> list[Path]:
    """Generated MediaPipe Holistic .pose files: one short (padded), two over max_frames (96)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    header = synthetic.holistic_header()
    for i, (lo, hi) in enumerate([(20, 30), (100, 120), (130, 150)]):
        data, conf = synthetic.random_clip(i, min_frames=lo, max_frames=hi)
        path = folder / f"clip{i}.pose"
        path.write_bytes(synthetic.pose_bytes(header, data, conf, 25.0))
        paths.append(path)
    return paths


NO_JAX = textwrap.dedent(
    """
    import sys
    BLOCKED = {"jax", "jaxlib", "flax", "orbax", "optax"}

    class BlockJax:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockJax())
    import numpy as np
    from signclip_jax.interop.torch_twin import TorchSignCLIP

    folder, out, texts, *poses = sys.argv[1:]
    texts = texts.split("|")
    twin = TorchSignCLIP.from_pretrained(folder)
    np.savez(out, poses=twin.embed_poses(poses), texts=twin.embed_texts(texts))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    """
)


def test_twin_from_release_folder_embeds_without_jax(exports, embedder, tmp_path):
    poses = _pose_files(tmp_path / "poses")
    script = tmp_path / "no_jax.py"
    script.write_text(NO_JAX)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, str(script), str(exports / "release"), str(tmp_path / "e.npz"),
         "|".join(PROMPTS), *map(str, poses)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    twin = np.load(tmp_path / "e.npz")
    dp = np.abs(embedder.embed_poses(poses) - twin["poses"]).max()
    dt = np.abs(embedder.embed_texts(PROMPTS) - twin["texts"]).max()
    print(f"tiny workdir, JAX vs twin (no JAX): poses {dp:.2e}, texts {dt:.2e}")
    assert dp <= MAX_DIFF and dt <= MAX_DIFF
    assert np.abs(twin["poses"]).max() > 1e-3  # not trivially equal


@pytest.mark.shared_data
def test_twin_parity_on_real_poses(exports, embedder, shared_pose):
    names = ["spreadthesign-ase-house.pose", "colin-1-HOUSE.pose", "colin-SAD.pose"]
    paths = [shared_pose(n) for n in names]
    twin = TorchSignCLIP.from_pretrained(exports / "release")
    dp = np.abs(embedder.embed_poses(paths) - twin.embed_poses(paths)).max()
    dt = np.abs(embedder.embed_texts(PROMPTS) - twin.embed_texts(PROMPTS)).max()
    print(f"real poses, JAX vs twin: poses {dp:.2e}, texts {dt:.2e}")
    assert dp <= MAX_DIFF and dt <= MAX_DIFF


# -------------------------------------------------- importing an original-style checkpoint
def _twin(projection="none", video_layers=2, *, minilm=False) -> TorchSignCLIP:
    """Random twin standing in for an original checkpoint: MiniLM's shapes (vocab 30522, hidden
    384, 6 text layers, 12 heads) or the tiny test BERT's (same vocabulary, hidden 32)."""
    bert = BertConfig.from_hf("minilm") if minilm else BertConfig(**TINY_BERT)
    config = dict(bert=bert.to_dict(), video_layers=video_layers, projection=projection,
                  pose_dim=609, max_frames=256, cls_token_id=101, sep_token_id=102)  # fmt: skip
    torch.manual_seed(0)
    twin = TorchSignCLIP(config).eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return twin


def _fairseq_dict(twin: TorchSignCLIP, *, fp16=True, position_ids=True) -> dict:
    """What fairseq's trainer saves (reference 8.1): fp16 weights, int64 position_ids buffers,
    numpy scalars in extra_state, an argparse.Namespace-free `args`."""
    sd = OrderedDict()
    for k, v in twin.state_dict().items():
        sd["mmmodel." + k] = v.half() if fp16 else v.clone()
    if position_ids:
        for key in importer.position_id_keys():
            sd["mmmodel." + key] = torch.arange(512)[None]
    return {
        "args": None,
        "cfg": {"task": {"_name": "mmtask"}, "common": {"fp16": fp16}},
        "model": sd,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "MMCriterion",
                "optimizer_name": "FP16Optimizer",
                "lr_scheduler_state": {"best": np.float64(3.25)},
                "num_updates": 1234,
            }
        ],
        "task_state": {},
        "extra_state": {"val_loss": np.float64(3.25), "train_iterator": {"epoch": 3}},
    }


@pytest.fixture(scope="module")
def original_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("original")
    twin = _twin(minilm=True)
    torch.save(_fairseq_dict(twin), folder / "checkpoint_best.pt")
    return twin, folder / "checkpoint_best.pt"


def test_fp16_fairseq_checkpoint_with_position_ids_imports(original_like, tmp_path):
    twin, path = original_like
    out = tmp_path / "imported"
    args = ["from-pytorch", f"--input={path}", f"--out={out}", "--text_model=minilm",
            "--config.data.length_buckets=(64,)"]  # fmt: skip
    assert convert.main(args) == 0
    run = run_lib.load_run(out)
    assert run.model_config.bert.num_attention_heads == 12  # from MiniLM's config
    assert run.model_config.video_layers == 2 and run.model_config.max_frames == 256
    assert run.settings.length_buckets == (64,)
    assert run.config.model.pretrained is False and run.config.batch_size == 448  # base recipe
    ours = to_state_dict(run.model)
    source = twin.state_dict()
    assert ours.keys() == source.keys()
    for key, value in source.items():
        np.testing.assert_array_equal(ours[key], value.half().float().numpy(), err_msg=key)

    # Same embeddings as the source network with the fp16-rounded weights (heads right).
    source.update({k: v.half().float() for k, v in source.items()})
    twin.load_state_dict(source)
    twin.tokenizer = run.tokenizer
    embedder = embedder_lib.Embedder(run, batch_size=4)
    rng = np.random.default_rng(0)
    feats = [(rng.normal(size=(t, 609)) * 0.3).astype(np.float32) for t in (64, 40, 3)]
    dp = np.abs(embedder.embed_features(feats) - twin.embed_features(feats)).max()
    dt = np.abs(embedder.embed_texts(PROMPTS) - twin.embed_texts(PROMPTS)).max()
    print(f"MiniLM-sized import, JAX vs torch: poses {dp:.2e}, texts {dt:.2e}")
    assert dp <= MAX_DIFF and dt <= MAX_DIFF


def test_import_needs_a_matching_text_model(original_like, tmp_path):
    _, path = original_like
    # Default text model is the original's bert-base-cased (a preset: no download needed to
    # see that its 28996-row vocabulary does not fit).
    with pytest.raises(UserError, match=r"bert-base-cased.*vocab_size 30522 vs 28996"):
        convert.from_pytorch(path, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _save(tmp_path, obj, name="ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


TINY = dict(text_model="minilm", num_heads=2)  # tiny BERT shapes, MiniLM's tokenizer


def test_architecture_mismatches_name_the_keys(tmp_path):
    base = _fairseq_dict(_twin(video_layers=2), fp16=False, position_ids=False)
    sd = base["model"]

    missing = OrderedDict((k, v) for k, v in sd.items() if not k.endswith("pooler.dense.bias"))
    path = _save(tmp_path, {**base, "model": missing})
    with pytest.raises(
        DataError, match=r"missing tensor\(s\) \['text_encoder\.pooler\.dense\.bias"
    ):
        convert.from_pytorch(path, tmp_path / "o", **TINY)

    extra = OrderedDict(sd, **{"mmmodel.video_encoder.videoconv.conv1d_0.bias": torch.zeros(3)})
    path = _save(tmp_path, {**base, "model": extra})
    with pytest.raises(DataError, match=r"unexpected.*videoconv\.conv1d_0\.bias"):
        convert.from_pytorch(path, tmp_path / "o", **TINY)

    gap = OrderedDict((k, v) for k, v in sd.items() if ".bert.encoder.layer.0." not in k)
    path = _save(tmp_path, {**base, "model": gap})
    with pytest.raises(DataError, match=r"video_encoder\.bert\.encoder\.layer\.\{0\}"):
        convert.from_pytorch(path, tmp_path / "o", **TINY)

    # A config that asks for another depth than the file has: the extra layer is named.
    path = _save(tmp_path, base)
    with pytest.raises(DataError, match=r"unexpected.*video_encoder\.bert\.encoder\.layer\.1\."):
        convert.from_pytorch(path, tmp_path / "o", overrides=["model.video_layers=1"], **TINY)

    wrong = OrderedDict(sd)
    wrong["mmmodel.text_encoder.pooler.dense.weight"] = torch.zeros(32, 10)
    path = _save(tmp_path, {**base, "model": wrong})
    with pytest.raises(
        DataError, match=r"text_encoder\.pooler\.dense\.weight \(32, 10\) != \(32, 32\)"
    ):
        convert.from_pytorch(path, tmp_path / "o", **TINY)

    # Sizes that are not the text model's, and no --num_heads: the heads are unknown.
    with pytest.raises(UserError, match=r"hidden_size 32 vs 384.*--num_heads"):
        convert.from_pytorch(_save(tmp_path, base), tmp_path / "o", text_model="minilm")
    assert not (tmp_path / "o").exists()


def test_projection_heads_need_a_stated_kind(tmp_path):
    twin = _twin(projection="linear", video_layers=1)
    path = _save(tmp_path, _fairseq_dict(twin, fp16=False, position_ids=False))
    with pytest.raises(UserError, match="linear_l2"):
        convert.from_pytorch(path, tmp_path / "o", **TINY)
    convert.from_pytorch(path, tmp_path / "o", overrides=["model.projection=linear_l2"], **TINY)
    run = run_lib.load_run(tmp_path / "o")
    assert run.model_config.projection == "linear_l2"
    assert run.model_config.bert.num_attention_heads == 2
    np.testing.assert_array_equal(
        np.asarray(run.model.text_projection.linear.kernel[...]).T,
        twin.text_projection.linear.weight.detach().numpy(),
    )


class NotData:  # module-level, so torch.save can pickle it by reference
    pass


class Payload:
    """Pickles as os.system(command): what a malicious `__reduce__` writes."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_foreign_metadata_reads_as_placeholders_and_code_is_refused(tmp_path, caplog):
    ckpt = _fairseq_dict(_twin(video_layers=1), fp16=False)
    path = _save(tmp_path, {**ckpt, "args": NotData()})
    with caplog.at_level(logging.WARNING, logger="signclip_jax.convert"):
        sd, meta, kind = convert.read_source(path)
    assert kind == "mmpt" and meta is None
    assert not any(k.startswith("mmmodel.") or "position_ids" in k for k in sd)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: checkpoint metadata held 1 object(s) of classes not loaded "
        "(tests.interop.test_convert.NotData) at args: read as placeholders; weights unaffected"
    ]
    # Data-only extras of real fairseq checkpoints load for real: numpy scalars, Namespace.
    caplog.clear()
    path = _save(tmp_path, {**ckpt, "args": argparse.Namespace(arch="mmarch")}, "ns.pt")
    with caplog.at_level(logging.WARNING, logger="signclip_jax.convert"):
        assert convert.read_source(path)[2] == "mmpt"
    assert not caplog.records

    # Code is refused before anything runs; a placeholder where a tensor belongs is named.
    marker = tmp_path / "pwned"
    path = _save(tmp_path, {**ckpt, "args": Payload(f"touch {marker}")}, "evil.pt")
    with pytest.raises(UserError, match=r"refusing to read .*evil\.pt.*posix\.system.*nothing"):
        convert.read_source(path)
    assert not marker.exists()
    model = OrderedDict(ckpt["model"], **{"mmmodel.text_encoder.pooler.dense.bias": NotData()})
    path = _save(tmp_path, {**ckpt, "model": model}, "bad.pt")
    with pytest.raises(DataError, match=r"pooler\.dense\.bias is an object of tests\.interop\."
                       r"test_convert\.NotData, a class not loaded, not a tensor"):  # fmt: skip
        convert.read_source(path)
    with pytest.raises(DataError, match="cannot read"):
        convert.read_source(_save_bytes(tmp_path / "junk.pt", b"not a checkpoint"))


FAIRSEQ_LIKE = textwrap.dedent(
    """
    import enum
    from collections import OrderedDict


    class Choice(enum.Enum):
        RETRI = "retri"


    class AverageMeter:
        def __init__(self):
            self.val, self.sum, self.count = 0.5, 1.0, 2


    class MetersDict(OrderedDict):
        pass


    class Config:  # like omegaconf's DictConfig: state through __getstate__/__setstate__
        def __init__(self, content):
            self._content = content

        def __getstate__(self):
            return {"_content": self._content, "_flags": {"readonly": True}}

        def __setstate__(self, state):
            raise RuntimeError("loading must not run this")
    """
)


def _with_fairseq_metadata(base: dict, folder: Path) -> tuple[dict, str]:
    """`base` with the metadata a released fairseq checkpoint carries (Namespace args with an
    enum, an omegaconf-like cfg, meters, TorchVersion, numpy values, a defaultdict), its
    classes from a module written to `folder`. Returns (checkpoint, module name); the caller
    saves it and then calls `_forget(folder, name)`."""
    name = f"fairseq_like_{os.getpid()}_{len(list(folder.iterdir()))}"
    (folder / f"{name}.py").write_text(FAIRSEQ_LIKE)
    sys.path.insert(0, str(folder))
    mod = importlib.import_module(name)
    history = dict(base["optimizer_history"][0], meter=mod.AverageMeter())
    meters = mod.MetersDict(loss=mod.AverageMeter())
    ckpt = {
        **base,
        "args": argparse.Namespace(arch="mmarch", task=mod.Choice.RETRI, fp16=True),
        "cfg": mod.Config({"model": {"_name": "mmmodel"}, "task": mod.Choice.RETRI}),
        "optimizer_history": [history],
        "extra_state": {
            **base["extra_state"],
            "metrics": {"train": meters},
            "torch_version": torch.torch_version.TorchVersion(torch.__version__),
            "np_scalar": np.float32(2.5),
            "np_array": np.arange(3),
            "best": collections.defaultdict(float, {"loss": 3.25}),
        },
    }
    return ckpt, name


def _forget(folder: Path, name: str) -> None:
    """The module is gone: not on sys.path, not imported, not importable."""
    sys.path.remove(str(folder))
    sys.modules.pop(name)
    importlib.invalidate_caches()
    assert importlib.util.find_spec(name) is None


def test_fairseq_checkpoint_with_foreign_metadata_imports_the_same_weights(tmp_path, caplog):
    twin = _twin(video_layers=1)
    base = _fairseq_dict(twin)  # fp16 weights, position_ids, numpy scalars
    mods = tmp_path / "mods"
    mods.mkdir()
    ckpt, name = _with_fairseq_metadata(base, mods)
    plain = _save(tmp_path, base, "plain.pt")
    zipped = _save(tmp_path, ckpt, "meta.pt")
    legacy = tmp_path / "meta_legacy.pt"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    _forget(mods, name)

    runs = {}
    for path in (plain, zipped, legacy):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="signclip_jax.convert"):
            convert.from_pytorch(path, tmp_path / path.stem, **TINY)
        runs[path.stem] = run_lib.load_run(tmp_path / path.stem)
        lines = [r.getMessage() for r in caplog.records if r.name == "signclip_jax.convert"]
        if path == plain:
            assert lines == []
            continue
        assert len(lines) == 1, lines
        line = lines[0]
        classes = ", ".join(sorted(
            [f"{name}.{c}" for c in ("AverageMeter", "Choice", "Config", "MetersDict")]
            + ["collections.defaultdict", "torch.torch_version.TorchVersion"]
        ))  # fmt: skip
        assert f"of classes not loaded ({classes}) at " in line, line
        places = ("args.task, cfg, optimizer_history[0].meter, extra_state.metrics.train, "
                  "extra_state.torch_version, extra_state.best: read as placeholders; "
                  "weights unaffected")  # fmt: skip
        assert line.startswith(f"{path}: checkpoint metadata held 7 object(s)"), line
        assert line.endswith(f" at {places}"), line
        assert name not in sys.modules
    reference = to_state_dict(runs["plain"].model)
    source = twin.state_dict()
    for stem in ("meta", "meta_legacy"):
        got = to_state_dict(runs[stem].model)
        assert got.keys() == reference.keys() == source.keys()
        for key, value in reference.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{stem}: {key}")
            np.testing.assert_array_equal(value, source[key].half().float().numpy())
    rng = np.random.default_rng(0)
    feats = [(rng.normal(size=(t, 609)) * 0.3).astype(np.float32) for t in (40, 7)]
    embedded = {}
    for stem in ("plain", "meta"):
        embedder = embedder_lib.Embedder(runs[stem], batch_size=2)
        embedded[stem] = (embedder.embed_features(feats), embedder.embed_texts(PROMPTS[:2]))
    np.testing.assert_array_equal(embedded["meta"][0], embedded["plain"][0])
    np.testing.assert_array_equal(embedded["meta"][1], embedded["plain"][1])
    assert np.abs(embedded["plain"][0]).max() > 1e-3


def test_bare_state_dicts_read_like_fairseq_dicts(exports):
    fairseq, _, kind = convert.read_source(exports / "fp32.pt")
    assert kind == "mmpt"
    for path in (exports / "release" / "model.safetensors",):
        bare, meta, kind = convert.read_source(path)
        assert kind == "state_dict" and meta is None and bare.keys() == fairseq.keys()
        for key, value in bare.items():
            np.testing.assert_array_equal(value, fairseq[key])


def _save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_init_from_restores_the_converted_params(exports, run, tmp_path):
    """What train does with --config.init_from=DIR: the factory (run.py) builds the model of
    the converted run directory and restores checkpoints/0 into its sharded parameters."""
    out = tmp_path / "imported"
    convert.from_pytorch(exports / "fp32.pt", out)
    config = run_lib.read_config(out)
    config.init_from = str(out)
    source = run_lib.source_from_config(config)
    assert source.model_config == run.model_config and source.step_dir.name == "0"
    model = signclip_model.SignCLIP(source.model_config, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh((-1, 1), ("data", "fsdp"))
    params = {
        "model": nnx.state(model, nnx.Param),
        "loss": losses.init_loss_params(config.loss.name, config.loss),
    }
    params = jax.device_put(params, sharding.replicated(mesh))
    restored = run_lib.init_params_from(source, params, config, mesh)
    nnx.update(model, restored["model"])
    expected = to_state_dict(run.model)
    for key, value in to_state_dict(model).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


# ----------------------------------------------------------------------- torch is an extra
def test_missing_torch_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    commands = {
        "to-pytorch": [f"--workdir={tmp_path}", "--format=mmpt", f"--out={tmp_path / 'x.pt'}"],
        "from-pytorch": [f"--input={tmp_path}", f"--out={tmp_path / 'wd'}"],
    }
    for command, args in commands.items():
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: convert.main([command, *args]))  # noqa: B023 (called at once)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: convert {command} needs the optional package 'torch', which is not "
            "installed: pip install 'signclip-jax[torch]'"
        ]
    with pytest.raises(MissingExtra, match=r"signclip-jax\[torch\]"):
        convert.read_source(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        convert.main(["from-pytorch", "--help"])
    assert exit_.value.code == 0 and "--input" in capsys.readouterr().out


NO_TORCH = textwrap.dedent(
    """
    import sys

    # As if torch were not installed: `import torch` raises ModuleNotFoundError and
    # importlib.util.find_spec("torch") (transformers' probe) answers None.
    sys.modules["torch"] = None
    import signclip_jax.evaluate, signclip_jax.embed, signclip_jax.run, signclip_jax.train.loop
    from signclip_jax.interop import convert
    assert sys.modules["torch"] is None, "the core imported torch"
    from signclip_jax.cli import run_cli
    run_cli(lambda: convert.main(sys.argv[1:]))
    """
)


def test_core_and_convert_import_without_torch(tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    convert_no_torch = lambda *args: subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    r = convert_no_torch("--help")
    assert r.returncode == 0 and "to-pytorch" in r.stdout, r.stderr[-3000:]
    r = convert_no_torch("from-pytorch", f"--input={tmp_path}", f"--out={tmp_path / 'wd'}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines() == [
        "error: convert from-pytorch needs the optional package 'torch', which is not "
        "installed: pip install 'signclip-jax[torch]'"
    ]


# ------------------------------------------------------------------------------------- CLI
def _cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.convert", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip


def test_cli_help_and_errors(exports, tiny_workdir, tmp_path):
    for args in ([], ["to-pytorch"], ["from-pytorch"]):
        r = _cli(*args, "--help")
        assert r.returncode == 0 and "usage" in r.stdout, r.stderr
    # An existing --out is refused (one line, exit 2), then replaced with --force.
    target = tmp_path / "out.pt"
    target.write_text("keep me")
    r = _cli("to-pytorch", f"--workdir={tiny_workdir}", "--format=mmpt", f"--out={target}")
    assert r.returncode == 2 and "--force" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert target.read_text() == "keep me"
    r = _cli("from-pytorch", f"--input={tmp_path / 'missing.pt'}", "--out=x", cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _cli("from-pytorch", "--input=a", "--out=b", "--bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr
    step_dir = f"--checkpoint={tiny_workdir}/checkpoints/4"
    assert (
        convert.main(["to-pytorch", step_dir, "--format=mmpt", f"--out={target}", "--force"]) == 0
    )
    assert (
        "mmmodel.text_encoder.pooler.dense.bias" in torch.load(target, weights_only=True)["model"]
    )
    # Relative paths work (Orbax itself wants absolute ones); --config.KEY=VALUE overrides.
    r = _cli("from-pytorch", "--input=out.pt", "--out=wd", "--config.batch_size=16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "wd" / "config.json").read_text())["batch_size"] == 16
    with pytest.raises(UserError, match=r"--config\.nope: unknown key"):
        convert.main(["from-pytorch", f"--input={target}", f"--out={tmp_path / 'wd2'}",
                      "--config.nope=1"])  # fmt: skip
    with pytest.raises(UserError, match=r"--config\.model\.video_layers='two' is not a int"):
        convert.main(["from-pytorch", f"--input={target}", f"--out={tmp_path / 'wd2'}",
                      "--config.model.video_layers=two"])  # fmt: skip
    assert not (tmp_path / "wd2").exists() and not (tmp_path / "x").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "folder"
    with pytest.raises(RuntimeError), staged_output(target, directory=True) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old").write_text("old")
    with staged_output(target, directory=True, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]
    assert [p.name for p in target.iterdir()] == ["new"]
    shutil.rmtree(target)
