"""No code runs because a file names it.

cmrtool imports and calls code from exactly two places: what the user names on the command line
(``--arch pkg.module:factory``, or the ``arch`` argument of the library) and cmrtool itself
(``cmrtool.testing.models``, and Hugging Face classes looked up by name in ``transformers``,
never with remote code). A reduced ``.safetensors`` file records the factory that built it
(``cmrtool_arch``) so that a person can see what to pass; that record is *checked*, not obeyed:
a file naming any other code is refused with the ``--arch`` that would trust it.

``python -m cmrtool`` puts the current directory first on ``sys.path``, so a ``helpers.py``
next to a data file would shadow any module of that name; :func:`drop_cwd_from_path` removes
that entry before anything else is imported. An explicit ``--arch`` still finds modules in the
current directory (:func:`import_user_module`), because the user named them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from cmrtool.errors import InputError

__all__ = ["OWN_FACTORIES", "drop_cwd_from_path", "trusted_arch", "import_user_module"]

OWN_FACTORIES = ("cmrtool.testing.models",)  # modules whose factories are cmrtool's own code


def drop_cwd_from_path() -> None:
    """Remove the current directory that ``python -m`` put at ``sys.path[0]`` (PEP 432's safe path)."""
    if not sys.path:
        return
    first = sys.path[0]
    try:
        is_cwd = first == "" or Path(first).resolve() == Path.cwd().resolve()
    except OSError:
        is_cwd = first == ""
    if is_cwd:
        del sys.path[0]


def trusted_arch(path: str | Path, recorded: str | None, given: str | None) -> str | None:
    """The architecture to build for a reduced file: ``given`` (the user's), else the file's
    ``recorded`` one only when it names no code outside cmrtool and transformers.

    Raises:
        InputError: the file names other code and the user did not pass ``--arch``.
    """
    if given:
        return given
    if not recorded or recorded.startswith("hf:"):
        return recorded or None
    module = recorded.partition(":")[0]
    if module in OWN_FACTORIES:
        return recorded
    raise InputError(
        f"{path} names code to run ({recorded}); cmrtool runs only code named on the command line",
        f"if you trust that code, pass --arch {recorded}",
    )


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)  # last: never shadows an installed module
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def import_user_module(name: str) -> ModuleType:
    """Import a module the user named with ``--arch`` (also found in the current directory)."""
    with _cwd_importable():
        return importlib.import_module(name)
