"""Video input for `embed` and `serve`: a video -> .pose bytes, when the optional video
environment is installed (signclip_jax.data.video drives MediaPipe in its own virtualenv)."""

from __future__ import annotations

import os

from signclip_jax.errors import UserError

VIDEO_HELP = "video input needs the optional video environment; see README"


class VideoUnavailable(UserError):
    """Video input without the optional video environment (as opposed to a bad video)."""


def video_to_pose_bytes(source: str | os.PathLike | bytes, *, name: str) -> bytes:
    """A video (path or bytes) -> bytes of a .pose file, via the optional video module.

    VideoUnavailable naming `name` when the video environment is not installed; a video that
    cannot be converted is the video module's own UserError (it names the video).
    """
    try:
        # Looked up at call time: the video module is optional (and tests stand in for it).
        from signclip_jax.data import video
    except ImportError:
        raise VideoUnavailable(f"{name}: {VIDEO_HELP}") from None
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    try:
        out = video.video_to_pose(source, name=name)
    except video.VideoEnvError as e:
        raise VideoUnavailable(f"{name}: {VIDEO_HELP} ({e})") from None
    return bytes(out)


__all__ = ["VIDEO_HELP", "VideoUnavailable", "video_to_pose_bytes"]
