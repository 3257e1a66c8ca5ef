"""Storage options: the keyword arguments of an fsspec filesystem, never shown.

Every function of raybary that takes a URL takes ``storage_options`` too (a
``dict`` or a :class:`StorageOptions`): they go to the fsspec filesystem of
that URL (``s3fs.S3FileSystem(**storage_options)`` for ``s3://``, and so on),
on top of fsspec's own configuration (its config files and
``FSSPEC_<PROTOCOL>_<KEY>`` variables, which fsspec merges under them).
On the command line they are ``--storage-option KEY=VALUE`` (repeatable;
:func:`parse_storage_option`), or the JSON object in
``$RAYBARY_STORAGE_OPTIONS`` (:data:`ENV_VAR`), which the flags override.

Values are often secrets (keys, tokens, connection strings), so a
:class:`StorageOptions` shows its keys only (``repr``, ``str``), and raybary
records no value anywhere: not in results (layout, manifest), reports, logs,
or a job's entrypoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from raybary.errors import OptionsError

__all__ = [
    "StorageOptions",
    "ENV_VAR",
    "OUTPUT_ENV_VAR",
    "INPUT_ENV_VAR",
    "parse_storage_option",
    "storage_options_from",
]

#: The environment variable holding storage options (a JSON object) for every URL
#: of a command; ``--storage-option`` flags override its keys.
ENV_VAR = "RAYBARY_STORAGE_OPTIONS"
#: Storage options of a command's OUTPUT only (``--output-storage-option``), where it
#: needs other ones than its input (e.g. another bucket's credentials).
OUTPUT_ENV_VAR = "RAYBARY_OUTPUT_STORAGE_OPTIONS"
#: Storage options of ``raybary plot``'s input store only (``--input-storage-option``).
INPUT_ENV_VAR = "RAYBARY_INPUT_STORAGE_OPTIONS"

_HIDDEN = "***"


class StorageOptions(Mapping[str, Any]):
    """fsspec storage options (a read-only mapping) that never show their values.

    ``repr`` and ``str`` give the keys only (``StorageOptions(key=***,
    secret=***)``), so options held by a run's objects cannot leak through a
    log line, a traceback or a report. Pickles as a plain mapping (Ray ships
    it to the actors, which open their stores with it).
    """

    __slots__ = ("_options",)

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        items = dict(options or {})
        bad = [k for k in items if not isinstance(k, str) or not k]
        if bad:
            raise OptionsError(f"storage option names must be non-empty strings, got "
                               f"{len(bad)} other key(s) of type "
                               f"{', '.join(sorted({type(k).__name__ for k in bad}))}")
        self._options = items

    @classmethod
    def of(cls, value: StorageOptions | Mapping[str, Any] | None) -> StorageOptions:
        """``value`` as :class:`StorageOptions` (``None``: none); anything but a
        mapping raises :class:`~raybary.errors.OptionsError` (a ``ValueError``)."""
        if isinstance(value, StorageOptions):
            return value
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise OptionsError(f"storage_options must be a mapping (e.g. a dict of fsspec "
                               f"keyword arguments), got {type(value).__name__}")
        return cls(value)

    def __getitem__(self, key: str) -> Any:
        return self._options[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def __repr__(self) -> str:
        return f"StorageOptions({', '.join(f'{k}={_HIDDEN}' for k in sorted(self._options))})"

    __str__ = __repr__

    def __reduce__(self):
        return (type(self), (self._options,))

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments for fsspec (a new dict)."""
        return dict(self._options)

    def merged(self, other: Mapping[str, Any] | None) -> StorageOptions:
        """These options with ``other``'s keys on top."""
        return StorageOptions({**self._options, **dict(other or {})})

    def keys_text(self) -> str:
        """The option names, for messages (``"endpoint_url, key, secret"``)."""
        return ", ".join(sorted(self._options)) or "none"

    def to_json(self) -> str:
        """The options as a JSON object (what :data:`ENV_VAR` holds); values
        that JSON cannot hold raise :class:`~raybary.errors.OptionsError`."""
        try:
            return json.dumps(self._options, sort_keys=True)
        except (TypeError, ValueError):
            raise OptionsError(f"storage options ({self.keys_text()}) must be JSON values "
                               "(strings, numbers, booleans, lists, objects) to be passed "
                               "on") from None

    def redact(self, text: str) -> str:
        """``text`` with every string value of these options (nested ones too,
        four characters or more) replaced by ``***``: for messages of errors
        that may quote what they were given."""
        out = str(text)
        for value in sorted(_strings(self._options), key=len, reverse=True):
            if len(value) >= 4:
                out = out.replace(value, _HIDDEN)
        return out

    @classmethod
    def from_json(cls, text: str, source: str) -> StorageOptions:
        """Options from a JSON object; ``source`` (e.g. ``"$RAYBARY_STORAGE_OPTIONS"``)
        names it in the error, which never quotes the text (it holds secrets)."""
        try:
            value = json.loads(text)
        except ValueError as e:
            raise OptionsError(f"{source} is not valid JSON (line {e.lineno}, column "
                               f"{e.colno}); it must be a JSON object of storage "
                               "options") from None
        if not isinstance(value, dict):
            raise OptionsError(f"{source} must be a JSON object of storage options, got a "
                               f"JSON {type(value).__name__}")
        return cls(value)


def _strings(value: Any) -> Iterator[str]:
    """Every string inside ``value`` (mappings' values, lists' items)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def parse_storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(KEY, value)``: the value parsed as JSON when it parses
    (``true``, ``3``, ``{"region_name": "eu-west-1"}``), else the text itself
    (``endpoint_url=http://host:9000``). A value that must stay a string
    although it reads as JSON is quoted: ``key='"1234"'``.

    Rule: one flag, one key. Reason: values are free text (URLs, keys) and
    only the first ``=`` separates. Errors never quote ``text`` (it may be a
    secret).
    """
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise OptionsError("a storage option is KEY=VALUE (e.g. endpoint_url=http://host:9000); "
                           "got one without a key or without '='")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def storage_options_from(pairs: Iterable[str] = (), *, env_var: str | None = ENV_VAR,
                         environ: Mapping[str, str] | None = None,
                         base: Mapping[str, Any] | None = None) -> StorageOptions:
    """The storage options of a command: ``base``, then the JSON object in
    ``environ[env_var]`` (if set and not empty), then each ``KEY=VALUE`` of
    ``pairs`` (:func:`parse_storage_option`), later ones overriding earlier ones."""
    environ = os.environ if environ is None else environ
    out = dict(base or {})
    if env_var and environ.get(env_var, "").strip():
        out.update(StorageOptions.from_json(environ[env_var], f"${env_var}"))
    for pair in pairs:
        key, value = parse_storage_option(pair)
        out[key] = value
    return StorageOptions(out)
