"""The package's layering: no module imports one above it; commands are imported by no library.

Every `import` of a signclip_jax module, at module top or inside a function, is read from the
source (ast) and checked against the layer order below, which follows the data flow
(README's architecture section). A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "signclip_jax"

# Lowest first. A module may import modules of its own layer or of a lower one. The longest
# matching prefix decides a module's layer.
LAYERS: list[tuple[str, ...]] = [
    # helpers every layer uses
    ("errors", "files", "config", "extras", "cli"),
    # .pose / video -> features -> batches
    ("data",),
    # the two towers
    ("model",),
    # the training library: losses, sharded step, optimiser, mesh
    (
        "train.losses",
        "train.grad_cache",
        "train.optim",
        "train.sharding",
        "train.distributed",
        "train.step",
        "train.preemption",
    ),
    # the run directory: checkpoints, configs, tokenizer, the model factory
    ("checkpoint", "run"),
    # evaluators, shared by training and the evaluate command
    ("evaluation",),
    # the trainer
    ("train.monitor", "train.loop"),
    # using a trained model
    ("serving", "interop", "models"),
    # command lines
    (
        "evaluation.cli",
        "serving.embed",
        "serving.server",
        "interop.convert",
        "tools",
        "train.__main__",
    ),
    # `python -m signclip_jax.X` entry modules and the `signclip-jax` dispatcher
    ("__main__", "evaluate", "embed", "serve", "convert", "prepare", "bench", "video", "search"),
]
COMMANDS = len(LAYERS) - 2  # layer index of the command-line modules
# Run by another interpreter (the video environment): imports nothing of the package.
STANDALONE = {"data.video_worker"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if not path.read_text().strip():
            continue  # an empty package __init__: nothing to import, nothing to place
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"signclip_jax.{module} has no layer in tests/test_layers.py"
    return best


def _imports(module: str) -> set[str]:
    """The signclip_jax modules `module` imports (anywhere in its body), without the prefix."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from signclip_jax.x import y`: y may be a submodule or a name in x.
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n.removeprefix("signclip_jax.") in MODULES else node.module
                     for n in names]  # fmt: skip
        else:
            continue
        for name in names:
            if name == "signclip_jax" or name.startswith("signclip_jax."):
                target = name.removeprefix("signclip_jax").removeprefix(".")
                if target:
                    found.add(target)
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        if module:
            layer(module)


def test_no_module_imports_a_module_above_it():
    wrong = []
    for module in sorted(MODULES):
        if not module:
            continue
        for target in sorted(_imports(module)):
            if target in STANDALONE:
                wrong.append(f"{module} imports the standalone {target}")
            elif layer(target) > layer(module):
                wrong.append(f"{module} (layer {layer(module)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_commands_do_not_import_each_other():
    """A command's library code lives below the commands (the layer test keeps libraries off
    them); one command split into modules (tools.bench) is the one exception."""
    wrong = []
    for module in sorted(MODULES):
        if not module or layer(module) != COMMANDS:
            continue
        for target in _imports(module):
            same = module.startswith("tools.bench.") and target.startswith("tools.bench")
            if layer(target) == COMMANDS and not same:
                wrong.append(f"{module} imports the command module {target}")
    assert not wrong, "\n".join(wrong)


def test_the_video_worker_imports_nothing_of_the_package():
    for module in STANDALONE:
        assert not _imports(module), module
