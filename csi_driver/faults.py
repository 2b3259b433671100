"""Named crash points for the kill -9 fault tests.

``crash_point(name)`` SIGKILLs the process when the environment variable
``HOSTKIT_CRASH_AT`` equals ``name``; otherwise it costs one dict lookup.  The
points sit between the durable steps of each operation, so the fault suite can
kill the driver at every step, restart it, retry the RPC and check that it
converges with nothing leaked.

Crash points (operation.step):

- store.before_rename: a record's temp file is written and fsynced, not renamed.
- create.after_record: the "creating" record is durable (in memory only where the
  new backing carries it: subvolumes), no image yet.
- create.before_subvolume_named: (subvolume pools) the new subvolume holds its
  limit and record under its temporary name, not renamed into place.
- create.after_image: the image file exists (sized), not formatted.
- clone.after_freeze: a clone's staged source filesystem is frozen, nothing
  copied yet (must be thawed on restart, as for snapshot.after_freeze).
- create.after_copy: (restore/clone) the source data is copied, not resized.
- create.after_mkfs: the filesystem is on the image, record still "creating".
- create.after_ready: the record says "ready", the response is not sent.
- delete.after_mark: the record says "deleting", the image is still there.
- delete.after_detach: stray loop devices detached, image still there.
- delete.after_remove_image: the image is gone, the record still exists.
- stage.after_attach: the loop device is attached, nothing recorded.
- stage.after_mkfs: a filesystem was created at stage (volume had none).
- stage.after_mount: the staging mount exists, the record does not say so.
- stage.after_record: staged and recorded, the response is not sent.
- unstage.after_unmount: the staging mount is gone, the loop still attached.
- unstage.after_detach: the loop is detached, the record still says staged.
- publish.after_mkdir: the target directory/file exists, nothing mounted.
- publish.after_mount: the bind mount exists, not recorded.
- publish.after_record: published and recorded.
- unpublish.after_unmount: the bind mount is gone, the target still exists.
- unpublish.after_remove: the target is removed, the record still lists it.
- expand.after_record: the new size is recorded, the image not grown.
- expand.after_grow_image: the image is grown, the loop not refreshed.
- expand.after_refresh: the loop device shows the new size, fs not grown.
- expand.after_grow_fs: the filesystem is grown.
- snapshot.after_record: the "creating" snapshot record is durable.
- snapshot.after_freeze: the source filesystem is frozen (must be thawed
  on restart: reconcile thaws frozen staging mounts of our volumes).
- snapshot.after_copy: the snapshot image is complete, the record not ready.
- snapshot.after_ready: the snapshot record says ready.
- delete_snapshot.after_mark: the snapshot record says "deleting".
- delete_snapshot.after_remove_image: the snapshot image is gone.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "HOSTKIT_CRASH_AT"

CRASH_POINTS = tuple(
    line.split(":", 1)[0].strip("- ").strip()
    for line in (__doc__ or "").splitlines()
    if line.startswith("- ") and "." in line.split(":", 1)[0]
)

log = logging.getLogger(__name__)


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if ``HOSTKIT_CRASH_AT`` names this point."""
    if os.environ.get(ENV) == name:
        log.critical("crash point %s reached: killing the process (%s)", name, ENV)
        os.kill(os.getpid(), signal.SIGKILL)
