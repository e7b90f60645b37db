"""Progress bars that stay quiet when nobody is watching (not a TTY, or asked to)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(*, total=None, desc=None, unit="img", disable: bool = False, **kw):
    """A tqdm bar on stderr; disabled when ``disable`` or stderr is not a terminal."""
    quiet = disable or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, smoothing=0.1, **kw)
