"""Reading torch.save checkpoints whose metadata pickles foreign classes, without running any
of it.

`torch.load(weights_only=True)` refuses a whole file as soon as any part pickles a class outside
its allow-list, and released fairseq checkpoints carry such classes next to the weights
(argparse/omegaconf configs, meters, `TorchVersion`, numpy values). `torch_load` reads them
anyway and still runs nothing from the file. Every global the pickle names is one of:

- allowed: what torch's weights-only unpickler allows (tensor rebuild functions, storages,
  dtypes, OrderedDict, ...), globals registered with `torch.serialization.add_safe_globals`,
  and the data-only numpy / argparse types of `data_globals()`: the real object;
- refused: functions of `builtins` (eval, exec, getattr, open, ...) and anything of a module
  that runs code or reaches the system (`CODE_MODULES`: os, subprocess, importlib, ...), even
  where allow-listed: the load stops with `UnsafePickle`, nothing of it called;
- anything else: a `Placeholder` subclass named after it. Its module is never imported; calling
  it only records the arguments; state, items and entries given to an instance are recorded.
  Instances are not callable and have no other behaviour.

The opcodes that call or mutate something are checked too (pickle's dispatch table, overridden):
REDUCE / NEWOBJ / INST / OBJ call only allowed globals or placeholder classes; BUILD sets state
only on placeholders and the few types torch builds (Tensor, Parameter, OrderedDict, Counter),
numpy arrays / dtypes and argparse.Namespace; items go only into lists / dicts / sets or
placeholders; persistent ids are only torch's storage records; extension codes are refused.

torch.load drives this module as its `pickle_module` (zip and legacy formats), the way it drives
its own weights-only unpickler: storages come through torch's persistent_load, so tensors load
exactly as with weights_only=True.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import builtins
import collections
import io
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

# Modules whose callables run code, import modules or touch processes/files: a checkpoint that
# names one of them is refused, never loaded with a placeholder in its place.
CODE_MODULES = frozenset(
    {
        "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "importlib", "runpy",
        "code", "codeop", "pty", "ctypes", "_ctypes", "marshal", "pickle", "_pickle", "shutil",
        "socket", "webbrowser", "pdb", "multiprocessing", "signal", "io", "_io",
    }
)  # fmt: skip
PLACES_SHOWN = 8  # locations listed in a report line


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names a callable that runs code (`names`); nothing of it was run."""

    def __init__(self, names: list[str], what: str = "names"):
        self.names = names
        super().__init__(f"the pickle {what} {', '.join(names)} (code, not data)")


# ------------------------------------------------------------------------------ placeholders
class Placeholder:
    """Stands for an object of a class that was not loaded (`pickled_name`, "module.qualname").

    Holds what the pickle gave it: constructor `args` / `kwargs`, BUILD `state`, appended
    `list_items`, set `dict_items` ([(key, value)]) and added `set_items`. Never calls, imports
    or re-pickles anything.
    """

    __slots__ = ("args", "dict_items", "kwargs", "list_items", "set_items", "state")
    pickled_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        if not cls.pickled_name:
            raise TypeError("Placeholder stands for a named class: use placeholder_class(name)")
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.list_items, self.dict_items, self.set_items = [], [], []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded the arguments

    def __repr__(self) -> str:
        return f"<placeholder of {self.pickled_name}>"

    def __reduce__(self):
        raise TypeError(f"a placeholder of {self.pickled_name} cannot be pickled")


def placeholder_class(name: str) -> type[Placeholder]:
    """A fresh Placeholder subclass standing for the class or function `name`."""
    attrs = {"__slots__": (), "pickled_name": name, "__module__": __name__}
    cls = type("Placeholder", (Placeholder,), attrs)
    cls.__qualname__ = f"Placeholder[{name}]"
    return cls


def _is_placeholder_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Placeholder) and bool(obj.pickled_name)


# --------------------------------------------------------------------------- allowed globals
def data_globals() -> list[Any]:
    """Data-only types fairseq checkpoints hold besides tensors (numpy scalars and arrays in
    metrics and val_loss, argparse.Namespace `args` of older fairseq): safe to build for real."""
    core = np._core.multiarray
    allowed: list[Any] = [np.dtype, np.ndarray, argparse.Namespace]
    for fn in (core.scalar, core._reconstruct):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]  # numpy 1.x pickles
    kinds = ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
    allowed += sorted({type(np.dtype(k)) for k in kinds}, key=str)
    return allowed


def allowed_globals() -> dict[str, Any]:
    """{"module.name": object} built for real: torch's weights-only allow-list, globals the
    user registered with torch.serialization.add_safe_globals, and data_globals."""
    from torch import _weights_only_unpickler as weights_only

    with torch.serialization.safe_globals(data_globals()):
        return {**weights_only._get_allowed_globals(), **weights_only._get_user_allowed_globals()}


def _refused(module: str, name: str) -> bool:
    if module.split(".")[0] in CODE_MODULES:
        return True
    if module == "builtins":  # builtin types are data (a placeholder); functions run code
        return not isinstance(getattr(builtins, name.split(".")[0], None), type)
    return False


# -------------------------------------------------------------------------------- unpickler
_BUILD_DICT_TYPES = (collections.OrderedDict, collections.Counter, argparse.Namespace)
_DICT_TYPES = (dict, collections.OrderedDict, collections.Counter)


class Unpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with every code path that calls or mutates checked (see
    the module docstring). `placeholders` maps the names read as placeholders to their class."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)  # per opcode, ours below

    def __init__(self, file, *, encoding: str = "ASCII", errors: str = "strict", **_: Any):
        super().__init__(file, fix_imports=True, encoding=encoding, errors=errors)
        self.allowed = allowed_globals()
        self._allowed_ids = {id(v): v for v in self.allowed.values()}
        self.placeholders: dict[str, type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if _refused(module, name):  # first: even where someone allow-listed it
            raise UnsafePickle([full])
        if full in self.allowed:
            return self.allowed[full]
        if full not in self.placeholders:
            self.placeholders[full] = placeholder_class(full)
        return self.placeholders[full]

    def _allowed(self, obj: Any) -> bool:
        return self._allowed_ids.get(id(obj)) is obj

    def _call(self, func: Any, args: Any, kwargs: Any = None, *, new: bool = False) -> Any:
        if type(args) is not tuple or (kwargs is not None and type(kwargs) is not dict):
            raise pickle.UnpicklingError("malformed call in the pickle (arguments not a tuple)")
        kwargs = kwargs or {}
        if _is_placeholder_class(func):
            return func(*args, **kwargs)
        if not self._allowed(func):
            raise UnsafePickle([_describe(func)], "calls")
        if new:  # NEWOBJ: as torch's weights-only unpickler
            if func is torch.nn.Parameter:
                return torch.nn.Parameter(*args, **kwargs)
            if not isinstance(func, type):
                raise UnsafePickle([_describe(func)], "calls")
            return func.__new__(func, *args, **kwargs)
        return func(*args, **kwargs)

    # -- opcodes that call ---------------------------------------------------------------------
    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, new=True))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, kwargs, new=True))

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ
        self.append(self._call(klass, tuple(args)))

    # -- opcodes that mutate -------------------------------------------------------------------
    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        kind = type(inst)
        if isinstance(inst, Placeholder):
            inst.state = state
        elif kind is torch.Tensor:  # legacy tensors
            inst.set_(*state)
        elif kind is torch.nn.Parameter or kind is np.ndarray or isinstance(inst, np.dtype):
            inst.__setstate__(state)
        elif kind in _BUILD_DICT_TYPES and type(state) is dict:  # e.g. state_dict._metadata
            if not all(type(k) is str for k in state):
                raise pickle.UnpicklingError("malformed BUILD in the pickle (non-str names)")
            inst.__dict__.update(state)
        else:
            raise UnsafePickle([f"BUILD of a {_describe(kind)}"], "asks for")

    def load_append(self) -> None:
        item = self.stack.pop()
        self._extend(self.stack[-1], [item])

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    def _extend(self, target: Any, items: list) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Placeholder):
            target.list_items.extend(items)
        else:
            raise UnsafePickle([f"items appended to a {_describe(type(target))}"], "asks for")

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items(self.stack[-1], [key, value])

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._set_items(self.stack[-1], items)

    def _set_items(self, target: Any, items: list) -> None:
        pairs = list(zip(items[::2], items[1::2], strict=True))
        if type(target) in _DICT_TYPES:
            for key, value in pairs:
                target[key] = value
        elif isinstance(target, Placeholder):
            target.dict_items.extend(pairs)
        else:
            raise UnsafePickle([f"items set on a {_describe(type(target))}"], "asks for")

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is set:
            target.update(items)
        elif isinstance(target, Placeholder):
            target.set_items.extend(items)
        else:
            raise UnsafePickle([f"items added to a {_describe(type(target))}"], "asks for")

    # -- persistent ids and extensions -----------------------------------------------------------
    def load_binpersid(self) -> None:
        self.append(self._persistent(self.stack.pop()))

    def load_persid(self) -> None:
        raise pickle.UnpicklingError("text persistent ids are not torch storages")

    def _persistent(self, pid: Any) -> Any:
        kind = pid[0] if type(pid) is tuple and pid else None
        if isinstance(kind, bytes):
            kind = kind.decode("ascii", "replace")
        if kind != "storage":  # what torch.save writes for tensors (never modules)
            raise pickle.UnpicklingError("only torch storages may be persistent ids")
        return self.persistent_load(pid)

    def load_ext(self) -> None:
        raise pickle.UnpicklingError("pickle extension codes are not used by torch.save")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.BINPERSID[0]] = load_binpersid
    dispatch[pickle.PERSID[0]] = load_persid
    for _ext in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_ext[0]] = load_ext
    del _ext


def _describe(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj):
        module = getattr(obj, "__module__", None) or "?"
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or "?"
        return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else "?"
    return type(obj).__name__


def load(file, **kwargs: Any) -> Any:
    """One pickle from `file` (what torch.load calls for the legacy format's headers)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """A pickle held in bytes, read as `load` does."""
    return load(io.BytesIO(data), **kwargs)


# ------------------------------------------------------------------------------- checkpoints
def torch_load(path: str | os.PathLike) -> Any:
    """torch.load of a torch.save file (zip or legacy format) on the CPU, through `Unpickler`.

    Raises UnsafePickle (a pickle.UnpicklingError) for a file that names code. Where the
    environment forces weights-only loads (TORCH_FORCE_WEIGHTS_ONLY_LOAD), that is used instead.
    """
    forced = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower()
    if forced in ("1", "y", "yes", "true"):
        with torch.serialization.safe_globals(data_globals()):
            return torch.load(Path(path), map_location="cpu", weights_only=True)
    return torch.load(
        Path(path), map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__]
    )


def placeholders_in(obj: Any) -> list[tuple[str, str]]:
    """[(where, "module.name")] of the placeholders in a loaded object, outermost first.

    `where` is a path like `extra_state.meters[0]`; placeholders inside another one carry its
    location. Placeholder classes held as values count too, except inside a placeholder (e.g.
    a defaultdict's `list` factory), where they are part of that object.
    """
    found = []
    for where, item, nested in _walk(obj):
        if isinstance(item, Placeholder) or (_is_placeholder_class(item) and not nested):
            found.append((where or "<root>", item.pickled_name))
    return found


def _walk(obj: Any) -> Iterator[tuple[str, Any, bool]]:
    """(path, value, inside a placeholder) of every value in containers, Namespaces, object
    arrays and placeholders (each object once)."""
    seen: set[int] = set()
    todo: list[tuple[str, Any, bool]] = [("", obj, False)]
    while todo:
        path, item, nested = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield path, item, nested
        children: list[tuple[str, Any]] = []
        if isinstance(item, dict):
            children = [(_key(path, k), v) for k, v in item.items()]
            children += [(f"{path}{{key}}", k) for k in item if not isinstance(k, str | int)]
        elif isinstance(item, list | tuple | set | frozenset):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(item)]
        elif isinstance(item, argparse.Namespace):
            children = [(_key(path, k), v) for k, v in vars(item).items()]
        elif isinstance(item, np.ndarray) and item.dtype == object:
            children = [(f"{path}[{i}]", v) for i, v in enumerate(item.ravel().tolist())]
        elif isinstance(item, Placeholder):
            parts = (item.args, item.kwargs, item.state, item.list_items, item.dict_items,
                     item.set_items)  # fmt: skip
            children = [(path, p) for p in parts]
            nested = True
        todo.extend((p, v, nested) for p, v in reversed(children))


def _key(path: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def report(found: list[tuple[str, str]]) -> str:
    """One line about `placeholders_in`'s result, e.g. "checkpoint metadata held 3 objects of
    classes not loaded (a.B, c.D) at args, extra_state.meters: read as placeholders"."""
    names = sorted({name for _, name in found})
    places: list[str] = []
    for where, _ in found:
        if not any(where == p or where.startswith((p + ".", p + "[")) for p in places):
            places.append(where)
    shown = ", ".join(places[:PLACES_SHOWN]) + (
        f" and {len(places) - PLACES_SHOWN} more" if len(places) > PLACES_SHOWN else ""
    )
    return (
        f"checkpoint metadata held {len(found)} object(s) of classes not loaded "
        f"({', '.join(names)}) at {shown}: read as placeholders"
    )
