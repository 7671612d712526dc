"""Files written whole or not at all (no pandas or torch here, so that light commands can write too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    """Write ``text`` through a temporary file, fsync and rename: readers never see half a file.

    ``durable=False`` skips the fsync (1-2 ms a file here) for files that may be lost in a crash, a cache's
    entries: the rename still keeps readers from half a file while the system runs, and after a crash an entry
    whose data never reached the disk is empty or unreadable JSON, which the cache computes again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
