"""One line instead of a traceback when a command's extra is not installed.

`pip install .` is the thin client; the other commands need an extra (`pip install '.[export]'`
...). Standard library only: the commands call `missing_extra` before importing anything of the
extra, so a thin install answers `crisis-export` with what to install.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence


def missing_modules(modules: Sequence[str]) -> list[str]:
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def missing_extra(prog: str, extra: str, modules: Sequence[str]) -> str | None:
    """One line naming the extra to install when any of `modules` is missing (else None); the
    commands exit with it: `if message := missing_extra(...): sys.exit(message)`."""
    missing = missing_modules(modules)
    if not missing:
        return None
    return (
        f"{prog}: this command needs the '{extra}' extra ({', '.join(missing)} not installed for "
        f"{sys.executable}): pip install '.[{extra}]' (or the crisis-triton[{extra}] package)"
    )
