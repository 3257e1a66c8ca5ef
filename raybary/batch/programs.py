"""The solver's compiled programs, kept whole on disk so a new process skips tracing.

JAX's persistent compilation cache saves XLA's compile, but a new process
still traces and lowers each program before it can look the cache up; for the
solver's programs that is most of a warm first call (about 2 s of the 3 s a
fresh actor's first shard takes over its later ones). :class:`Programs`
keeps each compiled program (a :class:`jax.stages.Compiled`) in memory and,
serialized, in a directory beside the compilation cache, keyed by everything
that decides the program: its name, the shapes and dtypes of its arguments,
its static arguments, the x64 mode, the backend and its devices, the versions
of jax and jaxlib, ``XLA_FLAGS``, and a hash of raybary's own source (a
changed solver never loads a stale program). A program that cannot be
serialized (some backends) runs through ``jax.jit`` as before.

Loading runs code from the directory, as JAX's own cache does: it is the
user's cache, not a place for files from elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Programs", "source_hash"]

#: Sub-directory of the compilation cache that holds the serialized programs.
SUBDIR = "raybary-programs"


def source_hash() -> str:
    """A hash of raybary's Python source (every ``.py`` file of the package):
    any change to what the solver traces gives new program keys."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def register_trees() -> None:
    """Register the solver's NamedTuples (its states, problems and outputs) for
    ``jax.export`` serialization, under their qualified names (once per
    process: a second registration of a type is refused and skipped)."""
    import jax

    from raybary.solvers import barycenter, plans, weights

    for module in (barycenter, plans, weights):
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, tuple)
                    and hasattr(value, "_fields") and value.__module__ == module.__name__):
                try:
                    jax.export.register_namedtuple_serialization(
                        value, serialized_name=f"{value.__module__}.{value.__qualname__}")
                except ValueError:  # registered before, in this process
                    pass


def _signature(args: tuple) -> tuple:
    """The tree structure of ``args`` and the shapes and dtypes of its leaves
    (hashable; cheap enough to compute on every call)."""
    import jax
    import numpy as np

    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)


def _written(key: tuple) -> tuple:
    """``key`` (as :meth:`Programs.call` makes it) in words, the same in every process."""
    name, (tree, leaves), static, x64 = key
    return (name, (str(tree), tuple((shape, str(dtype)) for shape, dtype in leaves)),
            tuple((k, repr(v)) for k, v in static), x64)


class Programs:
    """Compiled programs by key, in memory and (when ``directory`` is given) on disk.

    :meth:`call` runs ``fn`` (a ``jax.jit`` function) on ``args`` with
    ``static`` keyword arguments through the compiled program of that key:
    from memory, else loaded from disk, else compiled (through ``fn.lower``,
    so JAX's persistent cache still serves the XLA compile) and saved.
    Thread-safe: lanes call it at once.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = None if directory is None else Path(directory) / SUBDIR
        self._memory: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._environment: str | None = None
        self.loaded = 0  # programs loaded from disk
        self.saved = 0  # programs compiled and saved

    @staticmethod
    def turned_off() -> bool:
        """Whether ``RAYBARY_PROGRAMS`` says off (``off``, ``0``, ``false``, ``none``)."""
        return os.environ.get("RAYBARY_PROGRAMS", "").strip().lower() in ("off", "0", "false",
                                                                         "none")

    def clear(self) -> None:
        """Drop the programs held in memory (the files stay)."""
        with self._lock:
            self._memory.clear()

    def call(self, name: str, fn: Callable, args: tuple, static: dict) -> Any:
        """``fn(*args, **static)`` through the compiled program of its key."""
        import jax

        key = (name, _signature(args), tuple(sorted(static.items())),
               bool(jax.config.jax_enable_x64))
        compiled = self._memory.get(key)
        if compiled is None:
            with self._lock:
                compiled = self._memory.get(key) or self._load_or_compile(key, fn, args, static)
                self._memory[key] = compiled
        return compiled(*args)

    def _load_or_compile(self, key: tuple, fn: Callable, args: tuple, static: dict):
        import jax

        path = self._path(_written(key))
        register_trees()
        exported = self._load(path) if path is not None and path.exists() else None
        if exported is None:
            jitted = jax.jit(functools.partial(fn, **static))
            try:
                exported = jax.export.export(jitted)(*args)
            except Exception:  # noqa: BLE001 - e.g. a custom call export does not take
                return jitted  # runs as plain jax.jit, traced in every process
            if path is not None and self._save(path, exported):
                self.saved += 1
        else:
            self.loaded += 1
        return jax.jit(_named(key[0], exported.call))

    def _path(self, key: tuple) -> Path | None:
        if self.directory is None:
            return None
        if self._environment is None:
            self._environment = _environment()
        digest = hashlib.sha256(repr((key, self._environment)).encode()).hexdigest()[:32]
        return self.directory / f"{key[0]}-{digest}.bin"

    def _load(self, path: Path):
        """The exported program in ``path``, or None where it cannot be read (a
        torn or foreign file is removed, and the program is traced again)."""
        import jax

        try:
            return jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception:  # noqa: BLE001 - any unreadable file means: trace again
            path.unlink(missing_ok=True)
            return None

    def _save(self, path: Path, exported) -> bool:
        """Write ``exported`` to ``path`` atomically; False where it cannot be
        serialized or written (the program still runs, from memory)."""
        try:
            data = exported.serialize()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return True
        except Exception:  # noqa: BLE001 - saving is an optimisation only
            return False


def _named(name: str, call: Callable) -> Callable:
    """``call`` under the solver function's ``name`` (what JAX's logs and
    compile-time events call the program)."""
    def program(*args):
        return call(*args)

    program.__name__ = program.__qualname__ = name
    return program


def _environment() -> str:
    """What, besides a program's own key, decides its executable."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    return repr((jax.__version__, jaxlib.__version__, device.platform, device.device_kind,
                 device.client.platform_version, len(jax.devices()),
                 os.environ.get("XLA_FLAGS", ""), source_hash()))
