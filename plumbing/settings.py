"""
Settings: one dataclass field per setting, declared with option(default, help), parsed from
the command line by argparse and checked with every problem listed at once (ConfigError).
"""

import argparse
import math
import sys
from dataclasses import field, fields


def option(default, help, was=None):
    """A dataclass field whose help text travels with it (to --help and to the README); was:
    the field's former name, still taken as a flag, so users' scripts keep working."""
    return field(default=default, metadata={"help": help, "was": was})


class ConfigError(ValueError):
    """Every problem with the settings, listed at once; main() prints it and exits 2."""


def refuse(problems):
    """Raise one ConfigError listing every problem, if there are any."""
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


def flag(name):
    return "--" + name.replace("_", "-")


def positive(config, *names):
    """A problem line for every listed setting that is not > 0 (nan and inf included)."""
    return [f"{flag(n)} must be positive, got {getattr(config, n)}" for n in names
            if not (getattr(config, n) > 0 and math.isfinite(getattr(config, n)))]


def not_negative(config, *names):
    return [f"{flag(n)} must not be negative, got {getattr(config, n)}" for n in names
            if not (getattr(config, n) >= 0 and math.isfinite(getattr(config, n)))]


def in_range(config, name, low, high, low_open=False, high_open=False):
    value = getattr(config, name)
    ok = (math.isfinite(value) and (low < value if low_open else low <= value)
          and (value < high if high_open else value <= high))
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return [] if ok else [f"{flag(name)} must be in {bounds}, got {value}"]


def one_of(config, name, choices):
    value = getattr(config, name)
    return ([] if value in choices
            else [f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}"])


def parse_args(config_type, argv=None, description=None, known_only=False, epilog=None):
    """config_type from the command line: one flag per field (--layer-ratio for layer_ratio),
    its help the field's. known_only: (config, the flags that are not config_type's), for a
    script that passes the rest on; flags are never abbreviated, so --seed is never taken for
    --seeds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser(description=description, epilog=epilog, allow_abbrev=False,
                    formatter_class=HelpFormatter)
    for f in fields(config_type):
        # argparse formats help with %: a literal % is written %%
        text = f.metadata.get("help", "").replace("%", "%%").replace("%%%%", "%%")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                                default=f.default, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            was = [flag(f.metadata["was"])] if f.metadata.get("was") else []
            parser.add_argument(flag(f.name), *was, type=kind, default=f.default, help=text)
    if known_only:
        values, rest = parser.parse_known_args(argv)
        return config_type(**vars(values)), rest
    return config_type(**vars(parser.parse_args(argv)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the script's docstring as it is written."""


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (an unknown flag, a value that is not a number) are a
    ConfigError like any other bad setting: one `error:` line, printed by the first
    process only under torchrun, exit 2 on every process."""

    def error(self, message):
        raise ConfigError(f"{message} (--help lists the flags)")


def as_config(config_type, config):
    """config_type from itself, a list of command-line flags or a dict (whose unknown keys
    are an error, not silently ignored)."""
    if isinstance(config, (list, tuple)):
        return parse_args(config_type, config)
    if not isinstance(config, dict):
        return config
    values = config
    unknown = sorted(set(values) - {f.name for f in fields(config_type)})
    refuse([f"unknown field(s): {', '.join(unknown)}"] if unknown else [])
    return config_type(**values)
