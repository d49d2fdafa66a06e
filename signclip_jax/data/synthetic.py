"""Synthetic sign-language data: real `.pose` files with a MediaPipe Holistic header.

Every clip is a plausible holistic skeleton (body, face mesh, two 21-point hands, optional world
landmarks) whose hands perform one of N "signs". A sign is a dominant-hand trajectory (centre,
Lissajous-like movement, drift), a pair of hand shapes (finger curls, spread, roll) it morphs
between, and a non-dominant hand that rests out of view, mirrors the dominant hand or holds a
static base. Signers differ in body scale and position, speed (clip length), movement size,
noise, head sway, hand size and how often their hands go undetected, so a model must learn the
sign, not the signer. Nothing here imports mediapipe; files are written by pose-format.

Layout of the metadata CSV follows Spreadthesign (`pose`, `videoLanguage`, `language`, `text`):
one English row per clip, plus a row in another spoken language for a fraction of the clips,
so that a language filter has something to drop.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib

import numpy as np
from pose_format.numpy import NumPyPoseBody
from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions

from signclip_jax.data.pose import (
    BODY,
    BODY_POINTS,
    BODY_WORLD,
    FACE,
    FACE_MESH_POINTS,
    FACE_MIRROR,
    HAND_POINTS,
    LEFT_HAND,
    RIGHT_HAND,
)

# Skeleton edges (MediaPipe's POSE_CONNECTIONS and HAND_CONNECTIONS, as index pairs).
POSE_LIMBS = (
    (0, 1), (1, 2), (2, 3), (3, 7), (0, 4), (4, 5), (5, 6), (6, 8), (9, 10), (11, 12), (11, 13),
    (13, 15), (15, 17), (15, 19), (15, 21), (17, 19), (12, 14), (14, 16), (16, 18), (16, 20),
    (16, 22), (18, 20), (11, 23), (12, 24), (23, 24), (23, 25), (24, 26), (25, 27), (26, 28),
    (27, 29), (28, 30), (29, 31), (30, 32), (27, 31), (28, 32),
)  # fmt: skip
HAND_LIMBS = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (5, 9), (9, 10), (10, 11),
    (11, 12), (9, 13), (13, 14), (14, 15), (15, 16), (13, 17), (0, 17), (17, 18), (18, 19),
    (19, 20),
)  # fmt: skip

ENGLISH_WORDS = (
    "house", "sun", "police", "water", "tree", "friend", "school", "family", "book", "car",
    "dog", "cat", "apple", "bread", "milk", "doctor", "teacher", "mother", "father", "child",
    "city", "river", "mountain", "rain", "snow", "wind", "fire", "night", "morning", "evening",
    "money", "work", "music", "dance", "game", "ball", "chair", "table", "door", "window",
    "flower", "bird", "fish", "horse", "cow", "egg", "cheese", "coffee", "tea", "sugar",
    "salt", "red", "blue", "green", "yellow", "black", "white", "happy", "sad", "angry",
    "hungry", "tired", "sick", "hot", "cold", "big", "small", "old", "new", "good",
    "bad", "yes", "no", "please", "thanks", "hello", "goodbye", "sorry", "help", "stop",
    "go", "come", "eat", "drink", "sleep", "read", "write", "speak", "listen", "see",
    "love", "hate", "want", "need", "know", "think", "learn", "play", "run", "walk",
)  # fmt: skip
GERMAN_WORDS = (
    "Haus", "Sonne", "Polizei", "Wasser", "Baum", "Freund", "Schule", "Familie", "Buch", "Auto",
    "Hund", "Katze", "Apfel", "Brot", "Milch", "Arzt", "Lehrer", "Mutter", "Vater", "Kind",
    "Stadt", "Fluss", "Berg", "Regen", "Schnee", "Wind", "Feuer", "Nacht", "Morgen", "Abend",
    "Geld", "Arbeit", "Musik", "Tanz", "Spiel", "Ball", "Stuhl", "Tisch", "Tür", "Fenster",
    "Blume", "Vogel", "Fisch", "Pferd", "Kuh", "Ei", "Käse", "Kaffee", "Tee", "Zucker",
    "Salz", "rot", "blau", "grün", "gelb", "schwarz", "weiß", "glücklich", "traurig", "wütend",
    "hungrig", "müde", "krank", "heiß", "kalt", "groß", "klein", "alt", "neu", "gut",
    "schlecht", "ja", "nein", "bitte", "danke", "hallo", "tschüss", "Entschuldigung", "Hilfe",
    "halt", "gehen", "kommen", "essen", "trinken", "schlafen", "lesen", "schreiben", "sprechen",
    "zuhören", "sehen", "lieben", "hassen", "wollen", "brauchen", "wissen", "denken", "lernen",
    "spielen", "rennen", "laufen",
)  # fmt: skip
SIGN_LANGUAGES = ("ase", "gsg", "fsl", "bfi")


def holistic_header(
    face_points: int = 468, world_landmarks: bool = True, width: int = 640, height: int = 480
) -> PoseHeader:
    """A MediaPipe Holistic header as pose-format writes it (all components XYZC).

    POSE_LANDMARKS (33), FACE_LANDMARKS (`face_points`: 468, or 478 for the refined mesh with
    irises; points named "0".."N-1"), LEFT_HAND_LANDMARKS and RIGHT_HAND_LANDMARKS (21) and,
    if `world_landmarks`, POSE_WORLD_LANDMARKS (33). Limbs: MediaPipe's body and hand
    connections; the face has none.
    """
    if face_points not in (468, 478):
        raise ValueError(f"face_points must be 468 or 478, got {face_points}")

    def comp(name, points, limbs, colors):
        return PoseHeaderComponent(name, list(points), list(limbs), colors, "XYZC")

    hand_colors = [(min(255, 40 * (i // 4)), 255 - 12 * i, 12 * i) for i in range(len(HAND_LIMBS))]
    components = [
        comp(BODY, BODY_POINTS, POSE_LIMBS, [(255, 0, 0)]),
        comp(FACE, (str(i) for i in range(face_points)), (), [(255, 255, 255)]),
        comp(LEFT_HAND, HAND_POINTS, HAND_LIMBS, hand_colors),
        comp(RIGHT_HAND, HAND_POINTS, HAND_LIMBS, hand_colors),
    ]
    if world_landmarks:
        components.append(comp(BODY_WORLD, BODY_POINTS, POSE_LIMBS, [(255, 0, 0)]))
    return PoseHeader(0.2, PoseHeaderDimensions(width, height, 0), components)


# ---------------------------------------------------------------------------------------------
# Skeleton templates, in shoulder widths; x to the image right (the signer's left), y down,
# origin between the shoulders.

_BODY_TEMPLATE = {
    "NOSE": (0.0, -0.6), "LEFT_EYE_INNER": (0.05, -0.68), "LEFT_EYE": (0.09, -0.69),
    "LEFT_EYE_OUTER": (0.13, -0.68), "LEFT_EAR": (0.2, -0.63), "MOUTH_LEFT": (0.06, -0.49),
    "LEFT_SHOULDER": (0.5, 0.0), "LEFT_HIP": (0.32, 1.55), "LEFT_KNEE": (0.33, 2.45),
    "LEFT_ANKLE": (0.33, 3.3), "LEFT_HEEL": (0.34, 3.4), "LEFT_FOOT_INDEX": (0.38, 3.48),
}  # fmt: skip


def _body_template() -> np.ndarray:
    """[33, 2] resting body (elbows, wrists and hand points are filled per frame)."""
    out = np.zeros((len(BODY_POINTS), 2))
    for i, name in enumerate(BODY_POINTS):
        src = name.replace("RIGHT", "LEFT")
        if src in _BODY_TEMPLATE:
            x, y = _BODY_TEMPLATE[src]
            out[i] = (-x if "RIGHT" in name else x, y)
    return out


def _face_template(face_points: int) -> np.ndarray:
    """[face_points, 3] mirror-symmetric face mesh stand-in around the nose (not MediaPipe's)."""
    rng = np.random.default_rng(1234)  # fixed: the face is part of the format, not the data
    n = FACE_MESH_POINTS
    pts = np.zeros((n, 3))
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = np.sqrt(rng.uniform(0, 1, n))
    pts[:, 0] = -0.22 * radius * np.abs(np.cos(angle))  # ids below 248: the signer's right
    pts[:, 1] = -0.62 + 0.3 * radius * np.sin(angle)
    pts[:, 2] = -0.06 * (1 - radius**2) + 0.01 * rng.standard_normal(n)
    side = np.arange(n) < FACE_MIRROR  # one point of each mirror pair
    pts[FACE_MIRROR[side]] = pts[side] * (-1, 1, 1)
    pts[FACE_MIRROR == np.arange(n), 0] = 0.0  # midline
    if face_points > n:  # refined mesh: iris centre + 4 ring points per eye
        ring = np.array([[0, 0], [0.02, 0], [0, -0.02], [-0.02, 0], [0, 0.02]])
        right_eye, left_eye = np.array([-0.09, -0.69]), np.array([0.09, -0.69])
        irises = np.concatenate([right_eye + ring, left_eye + ring])
        pts = np.concatenate([pts, np.c_[irises, np.full(10, -0.05)]])
    return pts


# Hand in its own frame (shoulder widths): wrist at 0, fingers point up (-y), palm to camera.
_FINGER_BASES = np.array(
    [[-0.035, -0.03], [-0.05, -0.16], [-0.015, -0.17], [0.02, -0.16], [0.05, -0.145]]
)  # thumb CMC, index/middle/ring/pinky MCP
_FINGER_LENGTHS = np.array(
    [
        [0.05, 0.04, 0.035],
        [0.07, 0.045, 0.035],
        [0.075, 0.05, 0.038],
        [0.07, 0.045, 0.035],
        [0.055, 0.035, 0.03],
    ]
)
_FINGER_ANGLES = np.array([-0.9, -0.18, -0.03, 0.1, 0.25])  # fan, radians from straight up


def _hands(curl: np.ndarray, spread: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """[T, 21, 3] hand landmarks for per-frame finger curls [T, 5], spread [T], roll [T]."""
    t = curl.shape[0]
    out = np.zeros((t, 21, 3))
    for f in range(5):
        base = np.broadcast_to(_FINGER_BASES[f], (t, 2))
        pos = np.c_[base, np.zeros(t)]
        out[:, 1 + 4 * f] = pos
        direction = _FINGER_ANGLES[f] * spread
        bend = np.zeros(t)
        for j in range(3):
            bend = bend + curl[:, f] * (0.9 if f else 0.5)
            step = _FINGER_LENGTHS[f, j] * np.stack(
                [np.sin(direction) * np.cos(bend), -np.cos(direction) * np.cos(bend),
                 -np.sin(bend)], axis=-1)  # fmt: skip
            if f == 0:  # the thumb folds across the palm, not towards the camera
                across = np.c_[np.sin(bend), np.zeros((t, 2))]
                step = step * (1, 1, 0.4) + _FINGER_LENGTHS[f, j] * across
            pos = pos + step
            out[:, 2 + 4 * f + j] = pos
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]
    x, y = out[..., 0].copy(), out[..., 1].copy()
    out[..., 0], out[..., 1] = c * x - s * y, s * x + c * y
    return out * 1.6  # wrist to middle fingertip about half a shoulder width


# ---------------------------------------------------------------------------------------------
# Signs and signers.


def _make_signs(rng: np.random.Generator, n: int) -> list[dict]:
    """N distinct signs; each new one is redrawn until it is far enough from the others."""
    signs: list[dict] = []
    min_distance, tries = 1.0, 0
    while len(signs) < n:
        tries += 1
        if tries % 1000 == 0:  # crowded (many signs): accept closer ones rather than loop on
            min_distance *= 0.8
        sign = {
            "center": np.array([rng.uniform(-0.75, 0.15), rng.uniform(-0.8, 0.75)]),
            "amp": rng.uniform(0.04, 0.3, 2),
            "freq": rng.choice([0.5, 1.0, 1.5, 2.0, 3.0], 2),
            "phase": rng.uniform(0, 2 * np.pi, 2),
            "drift": rng.uniform(-0.25, 0.25, 2),
            "curl": rng.choice([0.0, 0.5, 1.0], (2, 5)),
            "spread": rng.uniform(0.4, 1.8, 2),
            "roll": rng.uniform(-0.9, 0.9, 2),
            "other": rng.choice(["rest", "mirror", "base"]),
            "base": np.array([rng.uniform(0.1, 0.55), rng.uniform(-0.2, 0.7)]),
            "frames": rng.uniform(50, 72),
        }
        key = np.r_[sign["center"] * 3, sign["curl"].ravel(), sign["drift"] * 2]
        if all(np.linalg.norm(key - s["key"]) > min_distance for s in signs):
            sign["key"] = key
            signs.append(sign)
    return signs


def _make_signer(rng: np.random.Generator, width: int, height: int) -> dict:
    scale = rng.uniform(0.2, 0.3) * width  # shoulder width in pixels
    return {
        "scale": scale,
        "offset": np.array(
            [width / 2 + rng.uniform(-0.08, 0.08) * width, height * rng.uniform(0.5, 0.62)]
        ),
        "speed": rng.uniform(0.75, 1.3),
        "amp": rng.uniform(0.85, 1.15),
        "noise": rng.uniform(0.003, 0.012),
        "sway": rng.uniform(0.0, 0.04),
        "hand": rng.uniform(0.9, 1.12),
        "drop": rng.uniform(0.0, 0.06),
        "edge": rng.uniform(0.0, 0.12),
        "depth": rng.uniform(-0.6, -0.2),
    }


def _visible(rng, t: int, edge: float, drop: float) -> np.ndarray:
    """[T] bool: hand detected; gaps at the start/end (hands at rest) and a few random misses."""
    seen = rng.random(t) >= drop
    seen[: int(rng.uniform(0, edge) * t)] = False
    end = int(rng.uniform(0, edge) * t)
    if end:
        seen[-end:] = False
    return seen


def synthetic_clip(
    sign: dict,
    signer: dict,
    rng: np.random.Generator,
    *,
    face_points: int = 468,
    min_frames: int = 40,
    max_frames: int = 90,
    width: int = 640,
    height: int = 480,
) -> tuple[np.ndarray, np.ndarray]:
    """One clip as (data [T, 1, N, 3] float32, confidence [T, 1, N] float32).

    N = 33 + face_points + 21 + 21 + 33 (world landmarks last; drop them for a header without).
    """
    t = int(np.clip(round(sign["frames"] * signer["speed"] * rng.uniform(0.92, 1.08)),
                    min_frames, max_frames))  # fmt: skip
    tau = np.linspace(0, 1, t)
    tau = tau + 0.03 * np.sin(np.pi * tau) * rng.uniform(-1, 1)  # uneven speed
    noise = signer["noise"]

    # Dominant (right) hand: wrist path and shape morph.
    amp = sign["amp"] * signer["amp"]
    wave = np.sin(2 * np.pi * sign["freq"][None] * tau[:, None] + sign["phase"][None])
    wrist_r = sign["center"] + amp * wave + sign["drift"] * (tau[:, None] - 0.5)
    wrist_r = wrist_r + rng.normal(0, 0.02, 2)
    mix = np.clip(tau * 1.4 - 0.2, 0, 1)[:, None]
    curl = (1 - mix) * sign["curl"][0] + mix * sign["curl"][1]
    spread = (1 - mix[:, 0]) * sign["spread"][0] + mix[:, 0] * sign["spread"][1]
    roll = (1 - mix[:, 0]) * sign["roll"][0] + mix[:, 0] * sign["roll"][1]
    hand_r = _hands(curl, spread, roll) * signer["hand"]

    # Non-dominant (left) hand.
    seen_l = _visible(rng, t, signer["edge"], signer["drop"])
    if sign["other"] == "mirror":
        wrist_l = wrist_r * (-1, 1)
        hand_l = hand_r * (-1, 1, 1)
    else:
        if sign["other"] == "rest":
            wrist_l = np.broadcast_to([0.45, 1.25], (t, 2)).copy()
            seen_l &= rng.random() < 0.3  # usually out of view
        else:
            wrist_l = np.broadcast_to(sign["base"], (t, 2)).copy()
        hand_l = _hands(np.full((t, 5), 0.2), np.ones(t), np.zeros(t)) * (-1, 1, 1)
        hand_l = hand_l * signer["hand"]
    seen_r = _visible(rng, t, signer["edge"], signer["drop"])

    # Body: template, swaying slightly; arms follow the wrists.
    sway = signer["sway"] * np.sin(2 * np.pi * (tau * rng.uniform(0.3, 1.0) + rng.uniform()))
    body = np.broadcast_to(_body_template(), (t, 33, 2)).copy()
    body[:, :11, 0] += sway[:, None]  # head
    wrists = {"LEFT": wrist_l, "RIGHT": wrist_r}
    hands = {"LEFT": hand_l, "RIGHT": hand_r}
    for side, sign_x in (("LEFT", 1.0), ("RIGHT", -1.0)):
        idx = {n: i for i, n in enumerate(BODY_POINTS)}
        shoulder = body[:, idx[f"{side}_SHOULDER"]]
        wrist = wrists[side]
        elbow = (shoulder + wrist) / 2 + np.array([0.25 * sign_x, 0.3])
        body[:, idx[f"{side}_ELBOW"]] = elbow
        hand_xy = wrist[:, None] + hands[side][..., :2]
        body[:, idx[f"{side}_WRIST"]] = wrist
        body[:, idx[f"{side}_PINKY"]] = hand_xy[:, 17]
        body[:, idx[f"{side}_INDEX"]] = hand_xy[:, 5]
        body[:, idx[f"{side}_THUMB"]] = hand_xy[:, 4]
    body_z = signer["depth"] + 0.1 * np.broadcast_to(np.linspace(-1, 1, 33), (t, 33))
    body_z = body_z.copy()
    for side in ("LEFT", "RIGHT"):
        for part in ("WRIST", "PINKY", "INDEX", "THUMB"):
            body_z[:, BODY_POINTS.index(f"{side}_{part}")] -= 0.5

    face = np.broadcast_to(_face_template(face_points), (t, face_points, 3)).copy()
    face[..., 0] += sway[:, None]

    def to_pixels(xy):
        return xy * signer["scale"] + signer["offset"]

    n_face = face_points
    n = 33 + n_face + 42 + 33
    data = np.zeros((t, n, 3))
    conf = np.zeros((t, n))
    jitter = rng.normal(0, noise, (t, n, 2))
    data[:, :33, :2] = to_pixels(body[..., :2] + jitter[:, :33])
    data[:, :33, 2] = body_z + rng.normal(0, noise, (t, 33))
    conf[:, :33] = rng.uniform(0.9, 1.0, (t, 33))
    conf[:, 25:33] = rng.uniform(0.01, 0.3, (t, 8))  # legs: out of frame, low visibility
    data[:, 33 : 33 + n_face, :2] = to_pixels(face[..., :2] + jitter[:, 33 : 33 + n_face] * 0.3)
    data[:, 33 : 33 + n_face, 2] = face[..., 2]
    conf[:, 33 : 33 + n_face] = 1.0
    start = 33 + n_face
    for k, (hand, wrist, seen) in enumerate(((hand_l, wrist_l, seen_l), (hand_r, wrist_r, seen_r))):
        sl = slice(start + 21 * k, start + 21 * (k + 1))
        xy = to_pixels(wrist[:, None] + hand[..., :2] + jitter[:, sl] * 0.5)
        z = hand[..., 2] - hand[:, :1, 2]  # MediaPipe hand z is relative to the wrist
        data[:, sl] = np.where(seen[:, None, None], np.concatenate([xy, z[..., None]], -1), 0.0)
        conf[:, sl] = seen[:, None].astype(float)
    world = slice(start + 42, n)
    data[:, world, :2] = (body[..., :2] - body[:, 23:25].mean(axis=1, keepdims=True)) * 90.0
    data[:, world, 2] = body_z * 0.3
    conf[:, world] = conf[:, :33]
    return data[:, None].astype(np.float32), conf[:, None].astype(np.float32)


def select_layout(
    data: np.ndarray,
    conf: np.ndarray,
    *,
    face_points: int,
    keep_face: int | None = None,
    world_landmarks: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Drops points of a `synthetic_clip` to match another header: fewer face points
    (`keep_face`, e.g. 468 of 478) and/or no world landmarks."""
    keep_face = face_points if keep_face is None else keep_face
    idx = np.r_[0:33, 33 : 33 + keep_face, 33 + face_points : 33 + face_points + 42]
    if world_landmarks:
        idx = np.r_[idx, 33 + face_points + 42 : 33 + face_points + 75]
    return data[:, :, idx], conf[:, :, idx]


def pose_bytes(header: PoseHeader, data: np.ndarray, conf: np.ndarray, fps: float) -> bytes:
    """Serialises a clip with pose-format's writer."""
    buffer = io.BytesIO()
    header.write(buffer)
    NumPyPoseBody(fps, data, conf).write(header.version, buffer)
    return buffer.getvalue()


def random_clip(
    seed: int = 0, *, face_points: int = 468, min_frames: int = 40, max_frames: int = 90
) -> tuple[np.ndarray, np.ndarray]:
    """One clip of a random sign by a random signer: (data [T, 1, N, 3], confidence [T, 1, N]),
    N = 33 + face_points + 42 + 33 (world landmarks last), for `holistic_header(face_points)`."""
    rng = np.random.default_rng(seed)
    sign = _make_signs(rng, 1)[0]
    signer = _make_signer(rng, 640, 480)
    return synthetic_clip(
        sign, signer, rng, face_points=face_points, min_frames=min_frames, max_frames=max_frames
    )


def _word(words: tuple[str, ...], k: int) -> str:
    return words[k % len(words)] + ("" if k < len(words) else f" {k // len(words) + 1}")


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    num_signs: int = 8,
    signers: int = 6,
    seed: int = 0,
    clips_per_signer: int = 1,
    fps: float = 25.0,
    min_frames: int = 40,
    max_frames: int = 90,
    face_points: int = 468,
    world_landmarks: bool = True,
    other_language_fraction: float = 0.25,
    sign_languages: tuple[str, ...] = SIGN_LANGUAGES[:3],
    width: int = 640,
    height: int = 480,
    csv_name: str = "metadata.csv",
) -> pathlib.Path:
    """Writes `out_dir/poses/*.pose` and a Spreadthesign-style CSV; returns the CSV path.

    num_signs x signers x clips_per_signer clips. Signer s signs in sign_languages[s % len].
    Every clip has an English row (`language` "en", `text` the sign's word); about
    `other_language_fraction` of them also have a German row ("de"). Deterministic from `seed`
    (same arguments, same bytes).
    """
    if num_signs < 1 or signers < 1 or clips_per_signer < 1:
        raise ValueError("num_signs, signers and clips_per_signer must be >= 1")
    out = pathlib.Path(out_dir)
    poses_dir = out / "poses"
    poses_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    signs = _make_signs(rng, num_signs)
    people = [_make_signer(rng, width, height) for _ in range(signers)]
    header = holistic_header(face_points, world_landmarks, width, height)
    head = io.BytesIO()
    header.write(head)
    head_bytes = head.getvalue()

    rows = []
    for s, signer in enumerate(people):
        language = sign_languages[s % len(sign_languages)]
        for k, sign in enumerate(signs):
            for r in range(clips_per_signer):
                clip_rng = np.random.default_rng([seed, s, k, r])
                data, conf = synthetic_clip(
                    sign,
                    signer,
                    clip_rng,
                    face_points=face_points,
                    min_frames=min_frames,
                    max_frames=max_frames,
                    width=width,
                    height=height,
                )
                if not world_landmarks:
                    data, conf = data[:, :, :-33], conf[:, :, :-33]
                name = f"{language}-{k:04d}-{s:03d}-{r:02d}.pose"
                body = io.BytesIO()
                NumPyPoseBody(fps, data, conf).write(header.version, body)
                (poses_dir / name).write_bytes(head_bytes + body.getvalue())
                rows.append((name, language, "en", _word(ENGLISH_WORDS, k)))
                if clip_rng.random() < other_language_fraction:
                    rows.append((name, language, "de", _word(GERMAN_WORDS, k)))
    csv_path = out / csv_name
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["pose", "videoLanguage", "language", "text"])
        writer.writerows(rows)
    return csv_path
