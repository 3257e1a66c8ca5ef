"""``--storage-option KEY=VALUE``: the storage options of every command that takes a URL.

One flag, one key, repeatable; the value is parsed as JSON when it parses
(:func:`raybary.storage.options.parse_storage_option`). The flags go on top
of ``$RAYBARY_STORAGE_OPTIONS`` (a JSON object). A command with two
locations (``run``, ``submit``, ``convert``: an output; ``plot``: an input
store) takes options for the second one that replace these there
(``--output-storage-option`` / ``--input-storage-option``, or their
environment variables). The parsed value of each flag is a
:class:`~raybary.storage.options.StorageOptions` (or ``None``: none given
for the second location), which never shows its values.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import click

from raybary.storage.options import (
    ENV_VAR,
    INPUT_ENV_VAR,
    OUTPUT_ENV_VAR,
    StorageOptions,
    storage_options_from,
)

__all__ = ["storage_options_flag", "output_storage_options_flag", "input_storage_options_flag",
           "FLAG_PARAMS"]

#: The parameter names of these flags (``raybary submit`` passes them to the job's
#: environment instead of its command line).
FLAG_PARAMS = ("storage_options", "output_storage_options", "input_storage_options")


def _parsed(env_var: str, *, optional: bool) -> Callable:
    """A click callback: the flags' ``KEY=VALUE`` texts (over ``$env_var``) as
    :class:`StorageOptions`; ``None`` when ``optional`` and neither is given."""
    def callback(ctx, param, values) -> StorageOptions | None:
        if optional and not values and not os.environ.get(env_var, "").strip():
            return None
        try:
            return storage_options_from(values, env_var=env_var)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=param.opts[0]) from None

    return callback


_VALUES = ("VALUE is JSON if it parses (true, 3, {\"region_name\": \"x\"}), else text. "
           "Values are never printed.")


def storage_options_flag(fn: Callable) -> Callable:
    """``--storage-option KEY=VALUE`` (param ``storage_options``): for every URL of the command."""
    return click.option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
        callback=_parsed(ENV_VAR, optional=False),
        help="fsspec storage option for the command's URLs (repeatable), e.g. "
             "endpoint_url=http://host:9000, key=ID, secret=KEY for s3://; on top of "
             f"${ENV_VAR} (a JSON object). {_VALUES}")(fn)


def output_storage_options_flag(fn: Callable) -> Callable:
    """``--output-storage-option KEY=VALUE`` (param ``output_storage_options``)."""
    return click.option(
        "--output-storage-option", "output_storage_options", multiple=True, metavar="KEY=VALUE",
        callback=_parsed(OUTPUT_ENV_VAR, optional=True),
        help="Storage option for OUTPUT only (repeatable): if any is given (or "
             f"${OUTPUT_ENV_VAR}), OUTPUT uses these instead of --storage-option's, e.g. "
             "another bucket's credentials.")(fn)


def input_storage_options_flag(fn: Callable) -> Callable:
    """``--input-storage-option KEY=VALUE`` (param ``input_storage_options``)."""
    return click.option(
        "--input-storage-option", "input_storage_options", multiple=True, metavar="KEY=VALUE",
        callback=_parsed(INPUT_ENV_VAR, optional=True),
        help="Storage option for the input store only (repeatable): if any is given (or "
             f"${INPUT_ENV_VAR}), the input store is read with these instead of "
             "--storage-option's.")(fn)
