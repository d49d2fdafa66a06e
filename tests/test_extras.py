"""signclip_jax.extras: a missing optional package is one clear error naming the extra."""

import sys

import pytest

from signclip_jax import extras
from signclip_jax.errors import UserError


def test_require_returns_the_module():
    import json

    assert extras.require("json", "demo", "x") is json


def test_missing_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flask", None)  # import flask -> ModuleNotFoundError
    with pytest.raises(
        UserError, match=r"serve needs .*'flask'.*pip install 'signclip-jax\[serve\]'"
    ):
        extras.require("flask", "serve", "serve")


def test_a_broken_install_keeps_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "scj_broken_pkg.py").write_text("import scj_no_such_inner_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="scj_no_such_inner_module"):
        extras.require("scj_broken_pkg", "eval", "x")
