"""safe_pickle: checkpoints with foreign metadata load (placeholders, exact tensors), and no
pickle payload ever runs: torch.save files (zip and legacy formats, protocols 2 and 4) and
hand-written opcode streams, each of which would create a marker file if anything ran."""

from __future__ import annotations

import argparse
import builtins
import collections
import functools
import importlib
import os
import pickle
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from signclip_jax.interop import safe_pickle
from signclip_jax.interop.safe_pickle import Placeholder, UnsafePickle

PAYLOAD_MODULE = '''
"""Would-be attacker code: every entry point creates the file it is given."""


def make_marker(path, *_):
    open(path, "w").close()
    return 0


class Init:
    def __init__(self, path):
        open(path, "w").close()


class New:
    def __new__(cls, path):
        open(path, "w").close()
        return object.__new__(cls)


class SetState:
    def __init__(self, path):
        self.path = path

    def __setstate__(self, state):
        open(state["path"], "w").close()


class Meter:
    """Harmless metadata: pickled by reference to this module, which loading never imports."""

    def __init__(self, avg):
        self.avg = avg
'''


class Reduce:
    """Pickles as `func(*args)`: what a malicious `__reduce__` writes."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle wants a callable `func`; never called here
        raise AssertionError("called while pickling")


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """(module, marker): a throwaway module on sys.path, imported for pickling, then dropped
    from sys.modules so that a load which imported it would show."""
    name = f"payload_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PAYLOAD_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(name)
    yield module, tmp_path / "pwned"
    sys.modules.pop(name, None)


def _checkpoint(extra) -> dict:
    """A small fairseq-shaped dict with `extra` in its metadata."""
    torch.manual_seed(0)
    sd = collections.OrderedDict(
        [("mmmodel.w", torch.randn(3, 4)), ("mmmodel.b", torch.randn(4).half())]
    )
    return {"model": sd, "args": None, "extra_state": {"payload": extra}}


def _save(obj, path: Path, fmt: str) -> Path:
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # zip, pickle protocol 4 (STACK_GLOBAL, FRAME, MEMOIZE)
        torch.save(obj, path, pickle_protocol=4)
    return path


def _refused_payloads(marker: Path):
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Reduce(os.system, (cmd,)),
        "eval": Reduce(builtins.eval, (code,)),
        "exec": Reduce(builtins.exec, (code,)),
        "subprocess": Reduce(subprocess.call, (["touch", str(marker)],)),
        "getattr+import_module": Reduce(
            Reduce(getattr, (Reduce(importlib.import_module, ("os",)), "system")), (cmd,)
        ),
        "partial(os.system)": functools.partial(os.system, cmd),
        "open": Reduce(builtins.open, (str(marker), "w")),
    }


FORMATS = ["zip", "legacy", "zip-protocol4"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(_refused_payloads(Path("m"))))
def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, fmt, name):
    marker = tmp_path / "pwned"
    path = _save(_checkpoint(_refused_payloads(marker)[name]), tmp_path / "c.pt", fmt)
    with pytest.raises(UnsafePickle, match=r"\(code, not data\)") as e:
        safe_pickle.torch_load(path)
    assert e.value.names and not marker.exists()


def test_refusal_names_the_callable(tmp_path):
    marker = tmp_path / "pwned"
    path = _save(_checkpoint(_refused_payloads(marker)["eval"]), tmp_path / "c.pt", "zip")
    with pytest.raises(UnsafePickle, match=r"names builtins\.eval"):
        safe_pickle.torch_load(path)
    with torch.serialization.safe_globals([builtins.eval]), pytest.raises(UnsafePickle):
        safe_pickle.torch_load(path)  # even where someone allow-listed it
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_foreign_callables_become_placeholders_and_never_run(payload, tmp_path, fmt):
    """The payload's module is importable at load time, yet it is neither imported nor run:
    its functions and classes (called, constructed, __new__, __setstate__) are placeholders,
    also when an allowed torch function is asked to call one."""
    mod, marker = payload
    m = str(marker)
    extra = {
        "call": Reduce(mod.make_marker, (m,)),
        "init": Reduce(mod.Init, (m,)),
        "setstate": mod.SetState(m),
        "torch.load": Reduce(torch.load, (m,)),  # a torch function outside the allow-list
        "meter": mod.Meter(1.5),
    }
    ckpt = _checkpoint(extra)
    path = _save(ckpt, tmp_path / "c.pt", fmt)
    sys.modules.pop(mod.__name__)
    out = safe_pickle.torch_load(path)
    assert not marker.exists() and mod.__name__ not in sys.modules
    for key, value in ckpt["model"].items():  # tensors exactly, dtype kept
        assert out["model"][key].dtype == value.dtype and torch.equal(out["model"][key], value)
    got = out["extra_state"]["payload"]
    assert all(isinstance(v, Placeholder) for v in got.values())
    assert got["call"].pickled_name == f"{mod.__name__}.make_marker" and got["call"].args == (m,)
    assert got["setstate"].state == {"path": m}  # recorded, __setstate__ not called
    assert got["meter"].state == {"avg": 1.5}
    assert got["torch.load"].pickled_name == "torch.serialization.load"
    found = dict(safe_pickle.placeholders_in(out))
    assert found["extra_state.payload.meter"] == f"{mod.__name__}.Meter"
    line = safe_pickle.report(safe_pickle.placeholders_in(out))
    assert f"{mod.__name__}.SetState" in line and "extra_state.payload.init" in line

    # Placeholders do nothing: not callable, no attributes, not re-picklable, and calling the
    # class only records the arguments.
    with pytest.raises(TypeError):
        got["call"]("x")
    with pytest.raises(AttributeError):
        got["init"].path  # noqa: B018
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(got["meter"])
    again = type(got["init"])(m)
    assert again.args == (m,) and not marker.exists()


def test_an_allowed_torch_function_handed_a_foreign_callable_does_not_run_it(payload, tmp_path):
    """torch._tensor._rebuild_from_type_v2 (on torch's allow-list) calls its first argument:
    given the payload function, it gets a placeholder class, and the load fails without a run."""
    mod, marker = payload
    obj = Reduce(
        torch._tensor._rebuild_from_type_v2, (mod.make_marker, torch.Tensor, (str(marker),), {})
    )
    path = _save(_checkpoint(obj), tmp_path / "c.pt", "zip")
    sys.modules.pop(mod.__name__)
    with pytest.raises(Exception):  # noqa: B017 (a placeholder is no tensor: any error will do)
        safe_pickle.torch_load(path)
    assert not marker.exists() and mod.__name__ not in sys.modules


# ------------------------------------------------------------------- hand-written opcodes
def _s(text: str) -> bytes:
    """A protocol-2 BINUNICODE string."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _raw_refused(mod: str, marker: str) -> dict[str, bytes]:
    cmd = f"touch {marker}".encode()
    return {
        "GLOBAL+REDUCE os.system": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        "INST os.system": b"(S'" + cmd + b"'\nios\nsystem\n.",
        "GLOBAL builtins.getattr": b"cbuiltins\ngetattr\n.",
        "GLOBAL builtins.__import__": b"c__builtin__\n__import__\n(S'os'\ntR.",  # Python 2 name
        "STACK_GLOBAL posix.system": b"\x80\x04" + _s("posix") + _s("system") + b"\x93"
        + _s(f"touch {marker}") + b"\x85R.",
        # BUILD with slot state on a real class: would replace argparse.Namespace.__init__
        "BUILD on a class": b"\x80\x02cargparse\nNamespace\n}}" + _s("__init__")
        + b"c" + mod.encode() + b"\nmake_marker\ns\x86b.",
        "BUILD on a tensor rebuild function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}"
        + _s("__defaults__") + b")s\x86b.",
        "APPEND to a dtype": b"\x80\x02cnumpy\ndtype\n" + _s("f8") + b"\x85RK\x01a.",
        "SETITEM on a Namespace": b"\x80\x02cargparse\nNamespace\n)\x81" + _s("k") + b"K\x01s.",
        "ADDITEMS to a Namespace": b"\x80\x04cargparse\nNamespace\n)\x81(K\x01\x90.",
        "REDUCE on a non-global": b"\x80\x02" + _s("x") + b")R.",
        "NEWOBJ of an allowed function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)\x81.",
    }  # fmt: skip


def _raw_inert(mod: str, marker: str) -> dict[str, bytes]:
    m = marker.encode()
    return {
        "GLOBAL+REDUCE": b"c" + mod.encode() + b"\nmake_marker\n(S'" + m + b"'\ntR.",
        "INST": b"(S'" + m + b"'\ni" + mod.encode() + b"\nInit\n.",
        "OBJ": b"(c" + mod.encode() + b"\nInit\nS'" + m + b"'\no.",
        "NEWOBJ": b"\x80\x02c" + mod.encode() + b"\nNew\n" + _s(marker) + b"\x85\x81.",
        "NEWOBJ_EX": b"\x80\x04c" + mod.encode() + b"\nNew\n)}" + _s("path") + _s(marker)
        + b"s\x92.",
        "BUILD": b"\x80\x02c" + mod.encode() + b"\nSetState\n)\x81}" + _s("path") + _s(marker)
        + b"sb.",
        "APPENDS+SETITEMS+ADDITEMS": b"\x80\x04c" + mod.encode() + b"\nMeter\n)\x81(K\x01K\x02e("
        + _s("k") + b"K\x03u(K\x04\x90.",
    }  # fmt: skip


def test_hand_written_payloads_are_refused(payload):
    mod, marker = payload
    sys.modules.pop(mod.__name__)
    init, defaults = argparse.Namespace.__init__, torch._utils._rebuild_tensor_v2.__defaults__
    for name, data in _raw_refused(mod.__name__, str(marker)).items():
        with pytest.raises(pickle.UnpicklingError):
            safe_pickle.loads(data)
        assert not marker.exists(), name
    assert argparse.Namespace.__init__ is init and mod.__name__ not in sys.modules
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults


def test_hand_written_foreign_objects_stay_inert(payload):
    mod, marker = payload
    sys.modules.pop(mod.__name__)
    for name, data in _raw_inert(mod.__name__, str(marker)).items():
        obj = safe_pickle.loads(data)
        assert isinstance(obj, Placeholder), name
        assert not marker.exists() and mod.__name__ not in sys.modules, name
    meter = safe_pickle.loads(_raw_inert(mod.__name__, str(marker))["APPENDS+SETITEMS+ADDITEMS"])
    assert meter.list_items == [1, 2] and meter.dict_items == [("k", 3)] and meter.set_items == [4]


def test_extension_codes_and_text_persistent_ids_are_refused():
    for data in (b"\x80\x02\x82\x01.", b"Pfoo\n.", b"\x80\x02" + _s("foo") + b"Q."):
        with pytest.raises(pickle.UnpicklingError):
            safe_pickle.loads(data)


# ------------------------------------------------------------------- harmless metadata
def test_data_types_load_for_real_and_others_as_placeholders(tmp_path):
    meta = {
        "args": argparse.Namespace(arch="mmarch", lr=[5e-5]),
        "torch_version": torch.torch_version.TorchVersion(torch.__version__),
        "val_loss": np.float64(3.25),
        "counts": np.arange(6, dtype=np.int32).reshape(2, 3),
        "objects": np.array([1, "a"], dtype=object),
        "best": collections.defaultdict(list, {"loss": [1.0]}),
        "counter": collections.Counter("aab"),
        "param": torch.nn.Parameter(torch.ones(2)),
        "bytes": b"\x00\xff",
        "complex": 1 + 2j,
    }
    for fmt in ("zip", "legacy"):
        out = safe_pickle.torch_load(_save(meta, tmp_path / f"{fmt}.pt", fmt))
        assert out["args"] == meta["args"] and out["counter"] == meta["counter"]
        assert out["val_loss"] == 3.25 and out["val_loss"].dtype == np.float64
        np.testing.assert_array_equal(out["counts"], meta["counts"])
        assert out["counts"].dtype == np.int32 and list(out["objects"]) == [1, "a"]
        assert torch.equal(out["param"], meta["param"]) and out["bytes"] == b"\x00\xff"
        assert out["complex"] == 1 + 2j
        version = out["torch_version"]
        assert isinstance(version, Placeholder) and version.args == (torch.__version__,)
        best = out["best"]
        assert best.pickled_name == "collections.defaultdict"
        assert best.dict_items == [("loss", [1.0])]
        found = safe_pickle.placeholders_in(out)
        assert sorted(found) == [
            ("best", "collections.defaultdict"),  # its `list` factory is part of it
            ("torch_version", "torch.torch_version.TorchVersion"),
        ]
        assert safe_pickle.report(found) == (
            "checkpoint metadata held 2 object(s) of classes not loaded (collections.defaultdict, "
            "torch.torch_version.TorchVersion) at torch_version, best: read as placeholders"
        )
