"""What both engines (local and Ray) share when they commit a row: the outcome of a stored or refused
body, and the clean-up after a killed run. Neither engine imports the other or the package's face."""

from __future__ import annotations

from imgclf.download._sink import Target
from imgclf.download._state import Outcome, State
from imgclf.download._store import IMAGES_DIR, Stored
from imgclf.errors import DataError
from imgclf.images import Rejected


def outcome(url_id: int, result: Stored | Rejected, http_status: int, attempts: int) -> Outcome:
    if isinstance(result, Rejected):
        if result.status == "storage_error":  # disk full, permissions: stop, nothing is lost
            raise DataError(result.reason)
        return Outcome(url_id, result.status, result.reason, http_status, attempts)
    return Outcome(url_id, "ok", "", http_status, attempts, result.sha256, result.path, result.width,
                   result.height, result.bytes, data=result.data)


def remove_orphans(state: State, target: Target) -> None:
    """After a killed run: drop stored files and shards whose result was never committed (they are
    refetched). Not for image files on object storage: listing every object costs more than an
    unreferenced object (content-addressed: a refetch rewrites the same name)."""
    target.remove_orphan_shards(state.shards())
    if target.remote:
        return
    data_dir = target.work_dir
    images = data_dir / IMAGES_DIR
    if not images.is_dir():
        return
    for path in images.glob("*/*"):
        if path.is_file() and not state.is_referenced(path.relative_to(data_dir).as_posix()):
            path.unlink(missing_ok=True)
