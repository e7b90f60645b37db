"""Shared bits of the command-line tools: logging setup and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Library logs to stderr: warnings by default, info with -v, errors only with --quiet."""
    # torch's deprecation notices for torch.jit are noise for a CLI user
    warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("veil_transforms")
    logger.setLevel(level)
    if not any(getattr(h, "_veil_cli", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        h._veil_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    for h in logger.handlers:
        if getattr(h, "_veil_cli", False):
            h.setLevel(level)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` (0: left alone) for the block, and restored after: a
    tool's ``main()`` called in-process (a notebook, a test) must not leave its caller on ``n`` threads."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_line(e: BaseException | str) -> str:
    s = str(e).strip()
    if isinstance(e, BaseException) and not s:
        s = type(e).__name__
    return " ".join(s.split())


def fail(prog: str, msg: BaseException | str, code: int = 2) -> int:
    """Print ``prog: error: msg`` as one line on stderr and return ``code``."""
    print(f"{prog}: error: {one_line(msg)}", file=sys.stderr, flush=True)
    return code


def disk_full(e: BaseException) -> OSError | None:
    """The "no space left" (or quota) error behind ``e`` (itself, or what it was raised from), if any: its
    text names no file when a write fails, so the tools say which folder's disk it is."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def debug() -> bool:
    """VEIL_DEBUG=1 shows tracebacks instead of one-line errors."""
    return os.environ.get("VEIL_DEBUG", "") not in ("", "0")


def unwritable_folder(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``folder`` (or in the folders it would be created as), or None."""
    f = Path(folder).absolute()
    while not f.exists() and f.parent != f:
        f = f.parent
    if not f.is_dir():
        return f"{f} is not a folder"
    if not os.access(f, os.W_OK | os.X_OK):
        return f"{f} is not writable"
    return None


def int_at_least(low: int, note: str = ""):
    """An argparse type: an integer >= ``low`` (``note`` says what the low end means)."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {v!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{note}, got {n}")
        return n
    return parse
