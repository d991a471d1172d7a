"""Every source of a download, in the order given, as chunks of future manifest rows: a table chunk
without local paths stays a frame (the fast URL path); folders, archives and tables of paths become
lists of `Item` / `Skipped` (see `_local` for folders and tables, `_archive` for archives)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from imgclf import sources
from imgclf.download._archive import list_archive
from imgclf.download._local import Chunk, Item, Skipped, table_items, walk_folder
from imgclf.download._pseudo import forget as forget_pseudo


def iter_items(paths: list[Path], chunk_rows: int, columns: sources.Columns,
               max_bytes: int, follow_links: bool = False) -> Iterator[pd.DataFrame | Chunk]:
    """Chunks in source order: a frame for a table chunk without local paths (the fast URL path),
    else a list of Item/Skipped."""
    forget_pseudo()  # links may have changed since an earlier run in this process
    for path in paths:
        kind = sources.source_kind(path)
        if kind == "table":
            for frame in sources.iter_sources([path], chunk_rows, columns):
                yield table_items(frame, path) if (frame["path"] != "").any() else frame
        elif kind == "folder":
            yield from _chunked(walk_folder(path, follow_links), chunk_rows)
        else:
            yield from _chunked(list_archive(path, max_bytes), chunk_rows)


def _chunked(items: Iterator[Item | Skipped], size: int) -> Iterator[Chunk]:
    chunk: Chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
