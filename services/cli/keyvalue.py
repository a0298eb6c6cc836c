"""ultralytics-style ``key=value`` arguments, turned into this parser's flags before it parses:
``inferline detect source=bus.jpg imgsz=640 conf=0.3 save_txt=True`` means
``inferline detect bus.jpg --imgsz 640 --conf 0.3 --save-txt``.

Only a key that is one of the subcommand's own options (or ``source``) is rewritten, and never
the value of a flag before it (``--labels a=b`` stays), so a file named ``x=y.jpg`` still
works as a path. ``True``/``False`` switch a flag on or leave it off; a list value may be
written ``classes=0,2`` or ``classes=[0,2]``. ``source=`` values go first, right after the
subcommand, so ``classes=0 source=x.jpg`` does not read ``x.jpg`` as a class.
"""

from __future__ import annotations

import argparse
import re

_KEY = re.compile(r"^([a-z][a-z0-9_]*)=(.*)$", re.DOTALL)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def as_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    if not argv:
        return argv
    sub = _subparser(parser, argv[0])
    if sub is None:
        return argv
    options = {action.dest: action for action in sub._actions if action.option_strings and action.dest != "help"}
    positional = next((a for a in sub._actions if not a.option_strings and a.dest != "help"), None)
    out: list[str] = []
    given: list[str] = []  # source=... values, put first: a list flag before them would take them
    takes_value = False
    for token in argv[1:]:
        match = None if takes_value else _KEY.match(token)
        if match is None:
            out.append(token)
            takes_value = _expects_value(sub, token)
            continue
        key, value = match.groups()
        if key == "source" and positional is not None:
            given.append(value)
        elif key in options:
            out.extend(_flag(sub, options[key], value))
        else:
            out.append(token)
    return [argv[0], *given, *out]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(name)
            return found if isinstance(found, argparse.ArgumentParser) else None
    return None


def _expects_value(sub: argparse.ArgumentParser, token: str) -> bool:
    """Whether ``token`` is a flag whose value comes next (so the next token is left alone)."""
    action = sub._option_string_actions.get(token)
    return action is not None and action.nargs != 0


def _flag(sub: argparse.ArgumentParser, action: argparse.Action, value: str) -> list[str]:
    flag = action.option_strings[-1]
    if action.nargs == 0:  # a switch: store_true
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return [flag]
        if lowered in _FALSE:
            return []
        sub.error(f"{action.dest}={value}: expected True or False")
    if action.nargs in ("+", "*"):
        return [flag, *_values(value)]
    return [flag, value]


def _values(value: str) -> list[str]:
    """``a,b`` or ``[a, b]`` -> ["a", "b"]."""
    stripped = value.strip().removeprefix("[").removesuffix("]")
    return [part.strip() for part in stripped.split(",") if part.strip()]
