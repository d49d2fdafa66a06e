"""tfds datasets (ArrayRecord `data_source`, no TensorFlow) and sign-language-datasets builders
(TensorFlow: the `sld` extra). tensorflow_datasets stays a lazy import: it is the `tfds` extra.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from pose_format import Pose
from pose_format.numpy import NumPyPoseBody
from pose_format.pose_header import PoseHeader

from signclip_jax.data import pose as pose_lib
from signclip_jax.data.sources.common import TEXT_KEYS, make_record
from signclip_jax.data.synthetic import holistic_header
from signclip_jax.errors import DataError, UserError
from signclip_jax.extras import MissingExtra, require

TFDS = "data.source='tfds' (tfds datasets read as array_record, no TensorFlow)"
SLD = "data.source='sld' (sign-language-datasets builders, with TensorFlow: about 2 GB)"


def _tfds():
    """tensorflow_datasets, or MissingExtra naming the `tfds` extra. Lazy: an optional package."""
    return require("tensorflow_datasets", "tfds", TFDS)


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_str(value.item())
    return "" if value is None else str(value)


def _read_pose_header(path: str) -> PoseHeader:
    """PoseHeader from a .pose or .poseheader file (only its header is read, within the
    header limits of data/pose.py)."""
    return pose_lib.read_pose_header(path)  # DataError naming the file


def example_to_record(
    example: dict[str, Any], index: int, *, header=None, header_name: str = ""
) -> dict[str, Any]:
    """A sign-language-datasets-style example -> record.

    Pose: "pose" as a dict {"data" [T,1,P,3], "conf" [T,1,P], "fps"} (PoseFeature; laid out
    by `header`, e.g. the dataset's holistic.poseheader, by default the MediaPipe Holistic
    layout with that many points), as bytes of an encoded .pose file,
    or "pose_path" (Spreadthesign's builder stores only the path). Text: "text", else
    "gloss". Label: "label"/"gloss_id" when integer.
    """
    id_ = _as_str(example.get("id")) or str(index)
    text = next((example[k] for k in TEXT_KEYS if k in example), "")
    label = -1
    for k in ("label", "gloss_id"):
        v = example.get(k)
        if v is not None and np.issubdtype(np.asarray(v).dtype, np.integer):
            label = int(v)
            break
    meta = dict(
        text=_as_str(text),
        sign_language=_as_str(example.get("sign_language", example.get("signed_language"))),
        spoken_language=_as_str(example.get("spoken_language")),
        label=label,
        signer=_as_str(example.get("signer", example.get("signer_id", ""))),
    )
    pose = example.get("pose")
    if isinstance(pose, dict) and "data" in pose:
        if header is None:
            header, header_name = default_holistic_header(np.shape(pose["data"]))
        if header is None:
            return make_record(
                id_,
                **meta,
                error=f"example carries pose arrays of shape {np.shape(pose['data'])} that match "
                "no MediaPipe Holistic layout; set data.pose_header to a .pose or .poseheader "
                "file with the same layout",
            )
        return make_record(id_, **meta, pose=_pose_from_arrays(pose, header, id_, header_name))
    if isinstance(pose, (bytes, np.bytes_)):
        return make_record(id_, **meta, pose_bytes=bytes(pose))
    path = example.get("pose_path")
    if path is not None:
        return make_record(id_, **meta, pose_path=_as_str(path))
    return make_record(id_, **meta, error="example has no pose (pose/pose_path)")


def default_holistic_header(shape: tuple[int, ...]):
    """(header, name) of the MediaPipe Holistic layout with shape[2] points, else (None, "").

    576 / 543 points: 468-point face with / without POSE_WORLD_LANDMARKS (sign-language-datasets'
    holistic.poseheader); 586 / 553: the refined 478-point face.
    """
    if len(shape) != 4:
        return None, ""
    for face in (468, 478):
        for world in (True, False):
            if shape[2] == 33 + face + 42 + (33 if world else 0):
                return holistic_header(face, world), f"<holistic face={face} world={world}>"
    return None, ""


def _pose_from_arrays(pose: dict[str, Any], header, id_: str, header_name: str):
    data = np.asarray(pose["data"], np.float32)
    conf = np.asarray(pose["conf"], np.float32)
    points = sum(len(c.points) for c in header.components)
    if data.ndim != 4 or data.shape[2] != points or conf.shape != data.shape[:3]:
        raise DataError(
            f"example {id_}: pose data of shape {data.shape} (confidence {conf.shape}) does "
            f"not fit header {header_name} with {points} points: expected [T, people, "
            f"{points}, dims]"
        )
    masked = np.ma.masked_array(data, mask=np.repeat((conf == 0)[..., None], data.shape[-1], -1))
    return Pose(header, NumPyPoseBody(fps=float(pose["fps"]), data=masked, confidence=conf))


class TfdsSource:
    """A tfds dataset prepared with file_format="array_record", read with `tfds.data_source`
    (random access, no TensorFlow). Examples are mapped by `example_to_record`.

    `name` is a registered dataset name (with `data_dir`), or a builder directory
    (`.../name/config/version`) read with `tfds.builder_from_directory`.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        *,
        pose_header: str | None = None,
    ):
        _tfds()
        self.name, self.data_dir = name, data_dir or None
        self.split = {"val": "validation"}.get(split, split)
        self.pose_header = pose_header or None
        self.skipped: list[tuple[str, str]] = []
        self._ds = None
        self._header = None
        self._builder_dir: str | None = None
        self._len = len(self._open())

    def _open(self):
        if self._ds is None:
            tfds = _tfds()
            folder = self._builder_dir or self.name
            try:
                if os.path.isfile(os.path.join(folder, "dataset_info.json")):
                    builder = tfds.builder_from_directory(folder)
                else:
                    builder = tfds.builder(self.name, data_dir=self.data_dir)
                self._ds = builder.as_data_source(split=self.split)
                # Worker processes reopen the prepared folder: no builder class needed there.
                self._builder_dir = str(builder.data_dir)
            except UserError:
                raise
            except Exception as e:
                raise DataError(
                    f"cannot open tfds dataset {self.name!r} split {self.split!r} "
                    f"(data_dir={self.data_dir}): {type(e).__name__}: {e}"
                ) from None
            if self.pose_header:
                self._header = _read_pose_header(self.pose_header)
        return self._ds

    def __getstate__(self):
        return {**self.__dict__, "_ds": None, "_header": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._open()[index]
        return example_to_record(
            example, index, header=self._header, header_name=self.pose_header or ""
        )

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


class SignLanguageDatasetsSource:
    """A sign-language-datasets builder (needs TensorFlow: the `sld` extra).

    Registers the builders by importing `sign_language_datasets.datasets`, prepares the
    dataset as array_record and then reads it like `TfdsSource`.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        *,
        builder_kwargs: dict[str, Any] | None = None,
        pose_header: str | None = None,
    ):
        try:
            require("sign_language_datasets.datasets", "sld", SLD)  # registers the builders
            require("tensorflow", "sld", SLD)
        except MissingExtra as e:
            raise MissingExtra(
                f"{e}; or prepare the dataset elsewhere and use data.source='tfds' "
                "(array_record, no TensorFlow)"
            ) from None
        tfds = _tfds()
        builder = tfds.builder(name, data_dir=data_dir, **(builder_kwargs or {}))
        builder.download_and_prepare(file_format="array_record")
        self._inner = TfdsSource(builder.data_dir, split, pose_header=pose_header)
        self.skipped = self._inner.skipped

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._inner[index]
