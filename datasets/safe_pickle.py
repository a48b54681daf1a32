"""Read data pickles (RefCOCO's ``refs(<splitBy>).p``) without running code they carry.

``pickle.load`` calls whatever global a pickle names (``os.system``, ``builtins.exec``, ...): a refs
file from a mirror or a colleague could run anything. The refs format needs nothing but lists,
dicts, strings and numbers, which pickle encodes with opcodes that name no global, in every
protocol (Python 2's protocol 0 and 2 files included: ``str`` -> STRING/SHORT_BINSTRING, ``unicode``
-> UNICODE/BINUNICODE, ``long`` -> LONG/LONG1). The few globals that harmless containers need are
allowed; every other global is refused with the file and the global named.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path
from typing import Any

#: Globals a data pickle may name: plain containers, and ``_codecs.encode``, which is how Python 3
#: writes ``bytes`` at protocols 0-2 (``_codecs.encode('...', 'latin1')``: a string in, bytes out).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", name) for name in ("set", "frozenset", "bytearray", "complex", "slice", "range")}
    | {("_codecs", "encode")}
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside :data:`ALLOWED_GLOBALS`; nothing of it was executed."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle: io.BufferedIOBase, path: Path) -> None:
        # encoding="ASCII" (Python 3's default, what LISA's REFER loader uses) decodes Python 2 ``str``.
        super().__init__(handle, encoding="ASCII")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__.set``) are checked under their Python 3 names, as pickle maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._path}: refused to load the global {module}.{name}: a data pickle may hold only lists, "
            f"dicts, strings and numbers (allowed globals: {sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)}). "
            "The file may be tampered with; use the original refs file of the data set."
        )


def load_data_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only plain data; :class:`UnsafePickleError` names any other global."""
    path = Path(path)
    with open(path, "rb") as handle:
        return _RestrictedUnpickler(handle, path).load()
