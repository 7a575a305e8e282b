"""Command-line parsing for the experiment CLIs: bad input is one line and exit status 2.

    app.run(main, flags_parser=cli.parse_flags)

absl and ml_collections report a config file that does not exist, or an override naming no field
(`--config.data.dri=x`), as a traceback (the file's only when the config is first read). Here both
are checked before and after absl parses the flags and reported with the closest valid names.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Mapping, NoReturn, Sequence

from absl import flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _closest(word: str, choices: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    if close:
        return f"closest {what}: {', '.join(close)}"
    shown = sorted(choices)
    return f"{what}: {', '.join(shown[:20])}{', ...' if len(shown) > 20 else ''}" if shown else f"no {what}"


def _config_flags(fv: flags.FlagValues) -> list[str]:
    """The names of the config-file flags (DEFINE_config_file)."""
    return [name for name in fv if isinstance(fv[name].parser, ConfigFileFlagParser)]


def _values(argv: Sequence[str], name: str) -> list[str]:
    """The values given to --name (`--name=v` or `--name v`) in argv."""
    out = []
    for i, arg in enumerate(argv):
        if re.fullmatch(rf"--?{re.escape(name)}", arg) and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif re.match(rf"--?{re.escape(name)}=", arg):
            out.append(arg.split("=", 1)[1])
    return out


def _overrides(argv: Sequence[str], name: str) -> list[str]:
    """The field paths of --name.a.b=v (and --noname.a.b) overrides."""
    pattern = re.compile(rf"--?(?:no)?{re.escape(name)}\.([^=]*)")
    return [m.group(1) for m in map(pattern.match, argv) if m]


def _check_file(name: str, value: str) -> None:
    path = value.split(":", 1)[0]
    if os.path.isfile(path):
        return
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        _fail(f"--{name}: config file {path} does not exist (no folder {folder})")
    names = [os.path.join(os.path.dirname(path), f) for f in os.listdir(folder)
             if f.endswith(".py") and not f.startswith("_")]
    _fail(f"--{name}: config file {path} does not exist; {_closest(path, names, 'config files')}")


def _check_override(name: str, config, field: str) -> None:
    """Fails naming the first part of `field` that `config` does not have."""
    node, done = config, []
    for part in field.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return  # a value, or a field type with its own parser: absl's message stands
        keys = [str(k) for k in node.keys()]
        if part not in keys:
            where = f"--{name}.{'.'.join(done)}" if done else f"--{name}"
            _fail(f"--{name}.{field}: {where} has no field {part!r}; {_closest(part, keys, 'fields')}")
        node, done = node[part], done + [part]


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> list[str]:
    """`flags_parser` for `absl.app.run`: absl's parse (of `flag_values`, default absl's FLAGS), with
    a missing config file, an override naming no field, or any other absl flag error (a bad value,
    an unknown flag, a bad `file.py:arg`) printed as one line (exit status 2)."""
    fv = flags.FLAGS if flag_values is None else flag_values
    names = _config_flags(fv)
    for name in names:
        for value in _values(argv, name):
            _check_file(name, value)
    try:
        return fv(list(argv))
    except Exception as e:  # noqa: BLE001 - bad input becomes one line below; anything else is re-raised
        error = e
    for name in names:
        fields = _overrides(argv, name)
        values = _values(argv, name)
        if fields and not values and fv[name].default is None:
            _fail(f"--{name}.{fields[0]}: overrides a field of the config file --{name}, which is not given; "
                  f"pass --{name} <file> before it")
        if fields and values:
            try:
                config = fv[name].parser.parse(values[-1])
            except Exception:  # noqa: BLE001 - the config itself failed; reported below
                break
            for field in fields:
                _check_override(name, config, field)
    if not isinstance(error, flags.Error):  # not bad input but a failure (e.g. a bug in a config file)
        raise error
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    _fail(lines[-1] if lines else type(error).__name__)
