"""Turning what goes wrong around a command (bytes, paths, files) into one sentence a person can act on."""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(Exception):
    """A mistake in how a command was called that is not a bad value (e.g. nothing on stdin): exit 2."""


class CommandFailed(Exception):
    """The command could not finish for a reason that is not the caller's mistake: exit 1."""


def describe_os_error(err: OSError) -> str:
    """'PATH: reason.' for an OSError that names a file, else the reason alone."""
    reason = (err.strerror or str(err)).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    return f"{err.filename}: {reason}." if err.filename else f"{reason[:1].upper()}{reason[1:]}."


def check_text(value: str, what: str) -> str:
    """Return ``value`` if it is valid UTF-8 text; else raise ValueError naming the first bad byte.

    Python hands undecodable command-line bytes over as lone surrogates (PEP 383); a tokenizer
    cannot take them, so they are reported here, where the person can still fix the input.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = value.encode("utf-8", "surrogateescape")[err.start:err.start + 1]
        raise ValueError(f"{what} is not valid UTF-8 text (byte 0x{raw.hex() if raw else '??'} at character "
                         f"{err.start}); pass UTF-8 text.") from None
    return value


def writable_file(path: str, option: str, default_suffix: str = "") -> Path:
    """The file ``option`` will write, checked before any work: its folder exists and is writable,
    it is not a folder itself, and a name without a suffix gets ``default_suffix`` (so the path
    printed afterwards is the path written)."""
    target = Path(path).expanduser()
    if target.is_dir() or path.endswith(os.sep):
        raise ValueError(f"{option} {path} is a directory; give a file name such as "
                         f"{target / ('out' + default_suffix)}.")
    if default_suffix and not target.suffix:
        target = target.with_name(target.name + default_suffix)
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the directory {folder} does not exist.")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{option} {path}: no permission to write {target}.")
    return target
