"""The ``tritonserver`` of the ``nvidia-pytriton`` wheel, found and made runnable for this Python.

Finds the binary without importing pytriton, lists the flags it takes, prepares a backends
folder with the python-backend stub for the running interpreter, and builds the environment in
which that stub runs this very interpreter (:func:`stub_environment`). The wheel has the python
backend only (plus ensembles): no ONNX Runtime, no TensorRT backend.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Mapping
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_INSTALL_HINT = "pip install 'nvidia-pytriton>=0.7' (or: pip install '.[server]')"

PathLike = str | os.PathLike[str]


class TritonNotFoundError(RuntimeError):
    """The embedded tritonserver (or its python-backend stub for this Python) is missing."""


def _pytriton_dir() -> Path:
    """The installed ``pytriton`` package folder, found without importing the package."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(
            f"nvidia-pytriton is not installed, and it brings the embedded tritonserver: "
            f"{_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary inside the installed nvidia-pytriton wheel."""
    binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotFoundError(
            f"{binary} is missing: the installed nvidia-pytriton has no tritonserver; "
            f"reinstall it: {_INSTALL_HINT}"
        )
    if not os.access(binary, os.X_OK):
        raise TritonNotFoundError(f"{binary} is not executable")
    return binary


def find_cache_dir(cache: str = "local") -> Path:
    """The wheel's ``--cache-directory``: the folder of ``<cache>/libtritoncache_<cache>.so``
    (Triton's default, /opt/tritonserver/caches, exists only in NVIDIA's containers). The
    nvidia-pytriton wheel ships the ``local`` cache only."""
    caches = _pytriton_dir() / "tritonserver" / "caches"
    library = caches / cache / f"libtritoncache_{cache}.so"
    if not library.is_file():
        shipped = sorted(p.name for p in caches.glob("*") if p.is_dir()) if caches.is_dir() else []
        raise TritonNotFoundError(
            f"{library} is missing: the installed nvidia-pytriton has no '{cache}' response cache "
            f"(it has: {', '.join(shipped) or 'none'}); reinstall it: {_INSTALL_HINT}"
        )
    return caches


@functools.lru_cache(maxsize=4)
def supported_flags(binary: Path) -> frozenset[str]:
    """The ``--flags`` that ``tritonserver --help`` lists (empty if --help fails)."""
    try:
        done = subprocess.run(
            [str(binary), "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"^\s*(--[a-z0-9-]+)", done.stdout + done.stderr, re.M))


def _stub_for_this_python() -> Path:
    stubs = _pytriton_dir() / "tritonserver" / "python_backend_stubs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stubs / version / STUB_NAME
    if not stub.is_file():
        available = sorted(
            (p.name for p in stubs.glob("*") if (p / STUB_NAME).is_file()),
            key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in v.split(".")),
        )
        raise TritonNotFoundError(
            f"nvidia-pytriton has no {STUB_NAME} for Python {version} "
            f"(it has: {', '.join(available) or 'none'}); run with one of those Python versions"
        )
    _check_libpython(version)
    return stub


def _check_libpython(version: str) -> None:
    """The stub links libpython<version>.so.1.0 by name; Debian's python3 does not install it."""
    name = f"libpython{version}.so.1.0"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if libdir and (Path(libdir) / name).exists():
        return
    if ctypes.util.find_library(f"python{version}"):
        return
    raise TritonNotFoundError(
        f"{name} not found: the python backend stub needs it (Debian/Ubuntu: "
        f"apt-get install libpython{version}; scripts/setup.sh does this when run as root)"
    )


def _symlink(target: Path, link: Path) -> None:
    """Make ``link`` point at ``target``, replacing whatever is there (atomically)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def prepare_backend_dir(cache_dir: PathLike) -> Path:
    """Build a ``--backend-directory`` whose ``python/`` holds the python backend.

    ``cache_dir/python/`` gets symlinks to ``libtriton_python.so``,
    ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for the
    running interpreter's major.minor. Symlinks, not copies: the stub and the backend find
    their bundled libraries through ``$ORIGIN``-relative RPATHs into the wheel. Idempotent.
    Returns ``cache_dir``.
    """
    stub = _stub_for_this_python()
    backend = _pytriton_dir() / "tritonserver" / "backends" / "python"
    sources = {name: backend / name for name in _BACKEND_FILES}
    sources[STUB_NAME] = stub
    for source in sources.values():
        if not source.is_file():
            raise TritonNotFoundError(f"{source} is missing; reinstall: {_INSTALL_HINT}")
    root = Path(cache_dir)
    python_dir = root / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        _symlink(source, python_dir / name)
    return root


def stub_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so its python-backend stubs run this very interpreter.

    - the running interpreter's bin folder (not resolved: in a venv it is the venv's) goes
      first on ``PATH``: the stub's CPython finds its prefix from ``python3`` on ``PATH``, so
      it picks up the venv's ``pyvenv.cfg`` and site-packages;
    - for a shared-library build, ``sysconfig``'s ``LIBDIR`` goes first on
      ``LD_LIBRARY_PATH`` so the stub loads this interpreter's ``libpython``, not a system
      copy of another patch release.
    """
    env = dict(os.environ if base is None else base)
    # No __pycache__ written into the repository's version folders: a repository may be
    # read-only, and under repository polling a new file there reloads the model.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if sys.executable:
        bin_dir = Path(sys.executable).parent
        if not (bin_dir / "python3").exists():
            warnings.warn(
                f"{bin_dir} has no 'python3': python-backend models may not see the "
                "site-packages of this interpreter",
                RuntimeWarning,
                stacklevel=2,
            )
        env["PATH"] = _prepend(str(bin_dir), env.get("PATH") or os.defpath)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        soname = sysconfig.get_config_var("INSTSONAME") or ""
        if libdir and (Path(libdir) / soname).exists():
            env["LD_LIBRARY_PATH"] = _prepend(libdir, env.get("LD_LIBRARY_PATH", ""))
    return env


def _prepend(entry: str, path_list: str) -> str:
    rest = [p for p in path_list.split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *rest])
