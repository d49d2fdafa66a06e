"""tfds sources: array_record data sources (pose arrays or paths), the example -> record
mapping, and the missing `tfds` / `sld` extras as one clear error."""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
from pose_format import Pose

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import sources
from signclip_jax.data.pipeline import record_features
from signclip_jax.errors import DataError, UserError
from signclip_jax.extras import MissingExtra
from tests.data.sources.helpers import data_config

_BUILDERS: dict[bool, type] = {}  # tfds registers builder classes by name: define each once


def _tiny_builder(data_dir, poses, with_arrays: bool):
    tfds = pytest.importorskip("tensorflow_datasets")
    if with_arrays not in _BUILDERS:
        _BUILDERS[with_arrays] = _define_builder(tfds, with_arrays)
    builder = _BUILDERS[with_arrays](data_dir=str(data_dir), file_format="array_record")
    builder.poses = poses
    builder.download_and_prepare()
    return builder


def _define_builder(tfds, with_arrays: bool):
    class TinySigns(tfds.core.GeneratorBasedBuilder):
        name = "tiny_signs_arrays" if with_arrays else "tiny_signs_paths"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            if with_arrays:
                pose = {
                    "data": tfds.features.Tensor(shape=(None, 1, 576, 3), dtype=np.float32),
                    "conf": tfds.features.Tensor(shape=(None, 1, 576), dtype=np.float32),
                    "fps": tfds.features.Scalar(dtype=np.int32),
                }
            else:
                pose = tfds.features.Text()
            features = {
                "id": tfds.features.Text(),
                "gloss": tfds.features.Text(),
                "sign_language": tfds.features.Text(),
                "spoken_language": tfds.features.Text(),
                "gloss_id": tfds.features.Scalar(dtype=np.int64),
                ("pose" if with_arrays else "pose_path"): pose,
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, path in enumerate(self.poses):
                ex = {"id": path.stem, "gloss": f"w{i}", "sign_language": "ase",
                      "spoken_language": "en", "gloss_id": i}  # fmt: skip
                if with_arrays:
                    p = Pose.read(path.read_bytes())
                    ex["pose"] = {
                        "data": np.asarray(p.body.data.data, np.float32),
                        "conf": np.asarray(p.body.confidence, np.float32),
                        "fps": int(p.body.fps),
                    }
                else:
                    ex["pose_path"] = str(path)
                yield str(i), ex

    TinySigns.__name__ = "TinySignsArrays" if with_arrays else "TinySignsPaths"
    return TinySigns


@pytest.mark.parametrize("with_arrays", [True, False])
def test_tfds_array_record_source(synth, tmp_path, with_arrays):
    _, pose_dir, _ = synth
    poses = sorted(pose_dir.glob("*.pose"))[:4]
    builder = _tiny_builder(tmp_path, poses, with_arrays)
    for name in (str(builder.data_dir), builder.name):
        src = sources.TfdsSource(name, "train", str(tmp_path))
        assert len(src) == 4
        src = pickle.loads(pickle.dumps(src))  # as a grain worker gets it
        for i in range(4):
            r = src[i]
            path = pose_dir / f"{r['id']}.pose"
            assert r["text"] == f"w{r['label']}" and r["sign_language"] == "ase"
            got = record_features(r, pose_lib.PoseSpec())
            assert got.tobytes() == pose_lib.load_features(path).tobytes()
    with pytest.raises(DataError, match="cannot open tfds"):
        sources.TfdsSource("tiny_signs_paths", "nosuchsplit", str(tmp_path))


def test_tfds_example_with_unknown_layout_is_an_error_record():
    ex = {"id": b"e", "text": b"t", "pose": {"data": np.zeros((3, 1, 10, 3)),
          "conf": np.ones((3, 1, 10)), "fps": 25}}  # fmt: skip
    r = sources.example_to_record(ex, 0)
    assert "error" in r and "pose_header" in r["error"]


def test_tfds_missing_gives_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(UserError, match=r"signclip-jax\[tfds\]"):
        sources.TfdsSource("x", "train")
    config = data_config(source="tfds", tfds_name="x")
    with pytest.raises(MissingExtra) as e:
        sources.make_source(config)
    assert str(e.value) == (
        "data.source='tfds' (tfds datasets read as array_record, no TensorFlow) needs the "
        "optional package 'tensorflow_datasets', which is not installed: "
        "pip install 'signclip-jax[tfds]'"
    )


def test_sld_without_tensorflow_gives_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sign_language_datasets", None)
    monkeypatch.setitem(sys.modules, "sign_language_datasets.datasets", None)
    with pytest.raises(UserError, match=r"signclip-jax\[sld\]"):
        sources.SignLanguageDatasetsSource("spread_the_sign")


def test_sld_with_builders_but_without_tensorflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sign_language_datasets", types.ModuleType("sld"))
    monkeypatch.setitem(
        sys.modules, "sign_language_datasets.datasets", types.ModuleType("sld.datasets")
    )
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(MissingExtra) as e:
        sources.make_source(data_config(source="sld", tfds_name="spread_the_sign"))
    message = str(e.value)
    assert "'tensorflow'" in message and "pip install 'signclip-jax[sld]'" in message
    assert message.endswith("or prepare the dataset elsewhere and use data.source='tfds' "
                            "(array_record, no TensorFlow)")  # fmt: skip
    assert "\n" not in message
