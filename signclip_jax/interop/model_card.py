"""The model card (README.md) of a release folder, generated from the run it is exported from.

Hugging Face reads the YAML front matter (library name, tags, license, pipeline tag, base
model) and shows the rest. Everything in the card comes from the run: the prompt format
(data.prompt_template, rendered), the pose features (components, points x dims, max frames),
the architecture, how it was trained (config.json) and how it scored (`evaluation_rows`):
training's validation rows of metrics.jsonl and the `evaluate` results in WORKDIR/eval/*.json,
only those of the exported step. A run with neither says "not evaluated"; no number is made up.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from signclip_jax import __version__
from signclip_jax import config as config_lib
from signclip_jax.data import text as text_lib
from signclip_jax.interop import release

log = logging.getLogger("signclip_jax.convert")

LIBRARY_NAME = "signclip-jax"
TAGS = (
    "sign-language",
    "pose",
    "contrastive",
    "clip",
    "signclip",
    "mediapipe-holistic",
    "jax",
    "flax",
)
PIPELINE_TAG = "feature-extraction"
DEFAULT_LICENSE = "other"
METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
EXAMPLE_WORD = "house"
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


# ------------------------------------------------------------------------------ evaluations
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _numbers(row: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, float]:
    """The top-level numeric entries of a results dict, in file order."""
    out = {}
    for key, value in row.items():
        number = _number(value)
        if key not in skip and number is not None:
            out[str(key)] = number
    return out


def evaluation_rows(workdir: str | os.PathLike, step: int) -> list[dict[str, Any]]:
    """What the run directory says about checkpoint `step`: one entry per evaluation, each
    {"source", "split", "metrics": {name: value}, "notes": [...]}.

    metrics.jsonl: the last non-training row of each split (an evaluator's name) logged at
    `step`. eval/*.json (the evaluate command): each file whose header names `step`, its tasks'
    top-level numbers as TASK/NAME. Unreadable lines and files are skipped with a warning.
    """
    workdir = epath.Path(workdir)
    found: list[dict[str, Any]] = []
    metrics = workdir / METRICS_FILE
    if metrics.exists():
        last: dict[str, dict[str, Any]] = {}
        for i, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d: not JSON, left out of the model card", metrics, i)
                continue
            if not isinstance(row, dict) or row.get("split", "train") == "train":
                continue
            if row.get("step") == step:
                last[str(row["split"])] = row
        for split, row in last.items():
            found.append({
                "source": f"training's validation ({METRICS_FILE})",
                "split": split,
                "metrics": _numbers(row, skip=("step",)),
                "notes": [],
            })  # fmt: skip
    eval_dir = workdir / EVAL_DIR
    if eval_dir.is_dir():
        for path in sorted(eval_dir.glob("*.json"), key=lambda p: p.name):
            try:
                results = json.loads(path.read_text())
                header = results["header"]
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("%s: not an evaluate result, left out of the model card", path)
                continue
            if header.get("step") != step:
                continue
            metrics_of, notes = {}, list(header.get("notes") or [])
            for task, values in results.items():
                if task in ("header", "files") or not isinstance(values, dict):
                    continue
                for name, value in _numbers(values).items():
                    metrics_of[f"{task}/{name}"] = value
                notes += [f"{task}: {n}" for n in values.get("notes") or []]
            extra = [f"flip {header['flip']}"] if header.get("flip", "none") != "none" else []
            found.append({
                "source": f"`evaluate` ({EVAL_DIR}/{path.name}"
                          + "".join(f", {e}" for e in extra) + ")",
                "split": str(header.get("split", "?")),
                "metrics": metrics_of,
                "notes": notes,
            })  # fmt: skip
    return found


_COUNTS = ("examples", "examined", "skipped", "classes", "candidates")


def _format(name: str, value: float) -> str:
    if name.split("/")[-1] in _COUNTS and value.is_integer():
        return str(int(value))
    return f"{value:.4f}"


# -------------------------------------------------------------------------------------- card
def _yaml_value(value: str) -> str:
    return value if _PLAIN.match(value) else json.dumps(value)  # a JSON string is valid YAML


def _front_matter(fields: Mapping[str, Any]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_value(str(v))}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_value(str(value))}")
    return "\n".join([*lines, "---"])


def _base_model(text_model: str) -> str | None:
    """The Hub id of the BERT both towers started from, when it is one (not a folder or the
    bundled alias)."""
    name = str(text_model).strip()
    if not name or name.lower() in text_lib.BUNDLED_ALIASES or "://" in name:
        return None
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.isdir(name):
        return None
    return name


def _table(rows: Sequence[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    out = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return out + [f"| {a} | {b} |" for a, b in rows]


def render(
    run: Any,
    *,
    dtype: str = "float32",
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of the release of `run` (run.Run: config, model_config, settings, step,
    workdir), whose weights are stored in `dtype`.

    `repo_id` ("ORG/NAME") goes into the usage examples (default: a placeholder); `license`
    into the front matter (default: the config's `license`, else "other").
    """
    config, mc, settings = run.config, run.model_config, run.settings
    spec = settings.spec
    step = int(run.step)
    text_model = str(config_lib.get(config.model, "text_model", "") or mc.text_model or "")
    license = license or str(config_lib.get(config, "license", "") or DEFAULT_LICENSE)
    ref = f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/NAME"
    title = repo_id.split("/")[-1] if repo_id else "SignCLIP pose/text model"
    front = _front_matter({
        "library_name": LIBRARY_NAME,
        "license": license,
        "tags": list(TAGS),
        "pipeline_tag": PIPELINE_TAG,
        "base_model": _base_model(text_model),
    })  # fmt: skip

    template = settings.prompt_template
    fmt = text_lib.PROMPT_TEMPLATES.get(template, template)
    names = dict(settings.signed_names)
    example = text_lib.render_prompt(
        template,
        text=EXAMPLE_WORD,
        spoken=settings.spoken_language,
        signed=settings.sign_language,
        signed_name=names.get(settings.sign_language, settings.sign_language),
    )
    dims = 3 if spec.include_z else 2
    hidden = mc.bert.hidden_size
    projection = {
        "none": "no projection head (mean-pooled hidden states)",
        "linear": "a linear projection head",
        "linear_l2": "a linear projection head and L2 normalisation",
    }.get(mc.projection, f"projection {mc.projection!r}")

    lines = [front, "", f"# {title}", ""]
    lines += [
        'A SignCLIP model (Jiang et al., EMNLP 2024, "SignCLIP: Connecting Text and Sign '
        'Language by Contrastive Learning"), trained with '
        f"signclip-jax {__version__}. It embeds sign-language pose "
        f"sequences and texts into one {hidden}-dimensional space: a pose tower (frame MLP, "
        f"then a {mc.video_layers}-layer BERT) and a text tower "
        f"({mc.bert.num_hidden_layers}-layer BERT), {projection}. A higher dot product means "
        "a better match.",
        "",
        "## Use",
        "",
        "JAX (`pip install signclip-jax`):",
        "",
        "```python",
        "import signclip_jax",
        "",
        f'model = signclip_jax.load("{ref}")',
        'poses = model.embed_poses(["sign.pose"])  # [N, ' + str(hidden) + "]",
        f'texts = model.embed_texts(["{example}"])  # [M, {hidden}]',
        "scores = poses @ texts.T",
        "```",
        "",
        "Command line:",
        "",
        "```bash",
        f"python -m signclip_jax.embed --model={ref} --poses sign.pose "
        f"--texts '{example}' --out=embeddings.npz",
        "```",
        "",
        "PyTorch, without JAX (`pip install 'signclip-jax[torch]'`):",
        "",
        "```python",
        "from signclip_jax.interop.torch_twin import TorchSignCLIP",
        "",
        f'twin = TorchSignCLIP.from_pretrained("{ref}")',
        'poses = twin.embed_poses(["sign.pose"])',
        f'texts = twin.embed_texts(["{example}"])',
        "```",
        "",
    ]
    if not repo_id:
        lines += ["`ORG/NAME` is the Hub repository this folder is uploaded to.", ""]

    lines += [
        "## Inputs",
        "",
        f"**Texts** are used as given: write the prompt the model was trained with, "
        f"`{fmt}` (template `{template}`), e.g. `{example}`. They are tokenised with the "
        f"tokenizer in this folder to at most {settings.text_max_len - 1} positions "
        f"(`[CLS]`, up to {settings.text_max_len - 3} word pieces, `[SEP]`).",
        "",
        f"**Poses** are `.pose` files (pose-format) of MediaPipe Holistic landmarks. Each frame "
        f"becomes {spec.feature_dim} features: the `{spec.components}` points "
        f"({spec.num_points} points x {dims} coordinates, {'x, y, z' if dims == 3 else 'x, y'}), "
        "normalised by shoulder width, legs hidden, missing points zero. At most "
        f"{spec.max_frames} frames are read: a longer pose keeps its first {spec.max_frames} "
        "(`embed --long_poses=window` averages windows of it instead).",
        "",
    ]

    lines += ["## Training", ""]
    source = str(config_lib.get(config.data, "source", "?"))
    rows = [
        ("steps", str(step) if step >= 0 else "unknown"),
        ("loss", f"`{config.loss.name}`"),
        ("batch size (global)", str(config_lib.get(config, "batch_size", "?"))),
        ("optimizer", f"Adam, lr {config_lib.get(config.optimizer, 'lr', '?')}, warm-up "
                      f"{config_lib.get(config.optimizer, 'warmup_steps', '?')} steps"),
        ("text model", f"`{text_model}`"
                       + (" (pretrained weights in both towers)"
                          if config_lib.get(config.model, "pretrained", False) else "")),
        ("data", f"`{source}`"),
        ("max frames", str(spec.max_frames)),
        ("compute dtype", str(mc.dtype)),
        ("weights in this folder", dtype),
    ]  # fmt: skip
    if source == "spreadthesign":
        languages = config_lib.get(config.data, "languages", ()) or ()
        rows.insert(6, ("spoken languages", ", ".join(map(str, languages)) or "all"))
    augment = dict(settings.augment)
    on = [k for k in ("temporal", "spatial", "noise") if augment.get(k)]
    on += [f"flip (p={augment['flip_prob']})"] if augment.get("flip_prob", 0) > 0 else []
    rate = augment.get("frame_dropout_rate", 0)
    on += [f"frame dropout ({rate})"] if rate > 0 else []
    rows.append(("augmentation", ", ".join(on) or "none"))
    lines += _table(rows, ("setting", "value"))
    lines += ["", "The full training config is in `config.json` (`training_config`).", ""]

    lines += ["## Evaluation", ""]
    evaluations = evaluation_rows(run.workdir, step)
    if not evaluations:
        lines += [
            f"Not evaluated: the run directory holds no validation or `evaluate` results for "
            f"step {step}, the checkpoint in this folder.",
            "",
        ]
    for entry in evaluations:
        lines += [f"{entry['source']}, split `{entry['split']}`, step {step}:", ""]
        lines += _table([(f"`{k}`", _format(k, v)) for k, v in entry["metrics"].items()],
                        ("metric", "value"))  # fmt: skip
        lines += [""] + [f"- {n}" for n in entry["notes"]] + ([""] if entry["notes"] else [])
    if evaluations:
        lines += [
            "Retrieval metrics follow the original SignCLIP definitions: T2V/V2T R@k over "
            "unique texts, P@k, median and mean rank; `std/` are per-example R@k.",
            "",
        ]

    lines += [
        "## Files",
        "",
        f"- `{release.HF_WEIGHTS}`: the weights ({dtype}), with the state_dict keys of the "
        "original `MMFusionSeparate`",
        f"- `{release.HF_CONFIG}`: model config, input settings, loss and training config",
        "- tokenizer files of the text tower",
        "",
    ]
    return "\n".join(lines)
