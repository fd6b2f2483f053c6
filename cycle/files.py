"""Never overwrite: what is in the way moves into a `history/` folder first. And `ensure_writable`, the
check at start that an output folder can take files."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

from cycle.errors import output_error

log = logging.getLogger(__name__)

HISTORY = "history"  # the one name of the folder that old outputs move into


def ensure_writable(folder: str | Path, what: str) -> Path:
    """Create `folder` and write a probe file in it: a read-only, full or impossible path fails now, with
    one `OutputError` naming it, instead of after hours of training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise output_error(folder, e, what) from e
    return folder


def move_aside(paths: Iterable[Path], history: Path, *, stamp: str | None = None, flat: bool = False
               ) -> Path | None:
    """Move the existing `paths` into `history/<stamp>/` (or, with flat=True, to
    `history/<stem>.<stamp><suffix>`, beside older versions of the same file). Returns the folder they
    went to, None when none existed. `stamp` defaults to the current time (YYYYmmdd-HHMMSS)."""
    paths = [Path(p) for p in paths if Path(p).exists()]
    if not paths:
        return None
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    dest = Path(history) if flat else Path(history) / stamp
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        target = dest / (f"{p.stem}.{stamp}{p.suffix}" if flat else p.name)
        shutil.move(str(p), target)
    log.warning("moved %s to %s (never overwritten)", ", ".join(p.name for p in paths), dest)
    return dest
