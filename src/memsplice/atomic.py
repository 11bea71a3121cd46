"""Directories written atomically: built in a sibling temp directory, then renamed into place.

A crash (or an exception) while writing leaves the previous directory, if any, untouched and removes the temp
directory; readers never see a half-written one. Used for memory checkpoints, training checkpoints, the learner's
saved state and the reasoner cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `target`; when the block succeeds it becomes `target`.

    An existing `target` is replaced (moved aside, then deleted once the new one is in place), or, with
    `keep_existing`, kept and the new copy discarded (another writer got there first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists() and keep_existing:
            shutil.rmtree(tmp)
            return
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
