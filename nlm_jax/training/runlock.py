"""One trainer per run directory: an exclusive `fcntl.flock` on `WORKDIR/.lock`.

    with workdir_lock(workdir):   # a second trainer gets a UserError naming this one's pid and host
      ...

The kernel releases the lock when its holder exits, however it exits (kill -9 too), so a lock file
left by a dead trainer is simply taken over. The file holds "pid host" of the holder for the
message; it is never deleted (deleting a lock file another process may be opening is a race).
flock is exclusive across the processes of one host; on a network filesystem shared by several
hosts it may not be (NFS), so only process 0 of a multi-host run takes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket

from nlm_jax.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds the run directory's lock for the duration of the block (creating `workdir`)."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"cannot create the lock file {path} ({e.strerror}); check that the workdir is "
                    "writable") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise UserError(f"cannot lock {path} ({e.strerror})") from None
      holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
      who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
      raise UserError(f"workdir {workdir} is in use by another nlm-jax train ({who}); wait for it to "
                      "finish or stop it, or choose another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    yield path
  finally:
    os.close(fd)  # releases the lock
