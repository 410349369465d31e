"""Load a kernel under test from ``package.module:attr`` or ``path/to/file.py:attr``.

Every failure is an :class:`~iqa_verify.errors.IqaVerifyError` that says which part was wrong, so the
CLI can exit 2 with a message instead of a traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iqa_verify.errors import IqaVerifyError

__all__ = ["load_kernel"]

_FORM = "expected 'package.module:attr' or 'path/to/file.py:attr'"


def _import_error(what: str, exc: BaseException) -> IqaVerifyError:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return IqaVerifyError(f"{what} could not be imported: {last}")


def _add_cwd_to_path() -> None:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def _module_from_file(path_text: str) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise IqaVerifyError(f"IMPL file={path_text!r}: no such file")
    name = "iqa_verify_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise IqaVerifyError(f"IMPL file={path_text!r}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    # a kernel file may import its own directory's modules and, inside a package, its package's
    # siblings (the directory above the outermost package goes on the path, as pytest does)
    root = path.parent
    while (root / "__init__.py").is_file():
        root = root.parent
    for folder in (root, path.parent):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # a broken user file: a usage error, not a crash
        del sys.modules[name]
        raise _import_error(f"IMPL file={path_text!r}", exc) from None
    return module


def _module_by_name(name: str) -> Any:
    _add_cwd_to_path()
    try:
        return importlib.import_module(name)
    except BaseException as exc:
        raise _import_error(f"IMPL module={name!r}", exc) from None


def load_kernel(impl: str) -> Callable[..., Any]:
    """The callable named by ``impl``; ``attr`` may be dotted (``Class.method``)."""
    where, sep, attr = impl.rpartition(":")
    if not sep or not where or not attr:
        raise IqaVerifyError(f"IMPL={impl!r}: {_FORM}")
    module = _module_from_file(where) if where.endswith(".py") or "/" in where else _module_by_name(where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise IqaVerifyError(f"IMPL attr={attr!r}: not found in {where!r}; callables there: {', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise IqaVerifyError(f"IMPL attr={attr!r}: {type(obj).__name__} is not callable")
    return obj
