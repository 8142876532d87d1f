"""The --config flag every command line defines: a config file whose unknown keys fail in one line.

ml_collections' DEFINE_config_file looks each --config.KEY=VALUE override up in the loaded config
while absl parses the command line; an unknown KEY escapes from that lookup as a bare
AttributeError or KeyError, and absl's app.run turns only flags.Error into a short usage message,
so a typo ended in a long traceback that said neither which key was wrong nor which keys exist.
`define_config_flag` checks the override keys against the loaded config first and raises
flags.IllegalFlagValueError naming the bad key and the nearest valid ones; app.run prints that
line and exits with status 1. Everything else (loading FILE.py:ARG, locking the config, parsing
and type-checking override values) is ml_collections' own.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags, config_path

NEAREST = 3  # valid keys an unknown-key error suggests


def config_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config, sections and leaves alike ("data", "data.root", ...): the
    names an override may use."""
    for key, value in config.items():
        yield prefix + key
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from config_keys(value, f"{prefix}{key}.")


def nearest_keys(key: str, keys: Sequence[str], n: int = NEAREST) -> list[str]:
    """The n keys most like `key`, scored on the whole dotted name plus its last part, so that a
    misspelt section (dta.root) and a key given without its section (lr) both find theirs."""
    leaf = key.rpartition(".")[2]
    score = lambda k: (difflib.SequenceMatcher(None, key, k).ratio()
                       + difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio())
    return sorted(keys, key=score, reverse=True)[:n]


def check_override_keys(config: Any, overrides: Sequence[str]) -> None:
    """Raises flags.IllegalFlagValueError for the first override key that is not in config."""
    for key in overrides:
        try:
            config_path.get_value(key, config)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            nearest = ", ".join(nearest_keys(key, list(config_keys(config))))
            raise flags.IllegalFlagValueError(
                f"unknown config key {key!r} (from --config.{key}); nearest: {nearest}") from None


class _CheckedConfigFlag(config_flags._ConfigFlag):
    """DEFINE_config_file's flag, checking override keys before ml_collections looks them up."""

    def _initialize_missing_parent_fields(self, config: Any, overrides: Sequence[str]) -> None:
        # The first step of _ConfigFlag._parse that has both the loaded config and the override
        # keys, and the first that looks the keys up.
        check_override_keys(config, overrides)
        super()._initialize_missing_parent_fields(config, overrides)


def define_config_flag(help: str, lock_config: bool = True, flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None) -> flags.FlagHolder:
    """Defines --config=FILE.py[:ARG] with --config.KEY=VALUE overrides, as
    DEFINE_config_file("config", None, help, lock_config=lock_config) does, but an unknown KEY is
    a flags error naming the nearest keys. Locked or not, an override cannot add a key; lock_config
    says whether the program's own code may. flag_values and sys_argv are for tests, as in
    DEFINE_config_file."""
    flag = _CheckedConfigFlag(parser=config_flags.ConfigFileFlagParser(name="config", lock_config=lock_config),
                              serializer=flags.ArgumentSerializer(), name="config", default=None,
                              help_string=help, flag_values=flag_values, sys_argv=sys_argv)
    return flags.DEFINE_flag(flag, flag_values)
