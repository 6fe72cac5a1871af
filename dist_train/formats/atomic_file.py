"""Replace a small file so that readers (and a crash at any moment) see the old or the new content, never a mix;
give what a library wrote with a private mode the modes the user's umask asks for."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to `path.tmp`, flush it to disk, rename it over `path`, then flush the folder entry too."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def current_umask() -> int:
    """This process's umask: from /proc on Linux (no change of process state), else set and put back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(path: str | os.PathLike) -> None:
    """Give `path` and everything below it the modes a plain open() / mkdir() would have: 0666 & ~umask for
    files, 0777 & ~umask for folders. For what libraries write privately (safetensors files are 0600 and
    `tempfile.mkdtemp` folders 0700 whatever the umask), so teammates on a shared cluster can read our outputs
    exactly when the user's umask says they may."""
    mask = current_umask()
    root = Path(path)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
