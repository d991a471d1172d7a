"""`imgclf audit --apply`: write the audit's decisions into DATA_DIR's manifest (the contract train reads).

Rows whose action is `drop` get status `excluded` (the error column names the finding); rows whose
action is `relabel` get the suggested label. The manifest as it was before the first apply is kept
as DATA_DIR/manifest.before-audit.parquet (never overwritten), so nothing downloaded is lost and
`cp manifest.before-audit.parquet manifest.parquet` undoes every apply. Applying twice changes
nothing more. Findings are matched by row and sha256 (auditdir.check_against_manifest).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf._files import atomic_path
from imgclf.auditdir import check_against_manifest
from imgclf.manifest import MANIFEST_NAME, read_manifest, write_manifest

BACKUP = "manifest.before-audit.parquet"


def apply(data_dir: Path, findings: pd.DataFrame, origin: Path) -> dict[str, Any]:
    manifest = read_manifest(data_dir)
    check_against_manifest(findings, manifest, origin)
    backup = Path(data_dir) / BACKUP
    if not backup.is_file():
        with atomic_path(backup) as tmp:
            shutil.copyfile(Path(data_dir) / MANIFEST_NAME, tmp)
    position = pd.Series(range(len(manifest)), index=manifest["row"])
    usable = manifest["status"] == "ok"

    drop = findings[findings["action"] == "drop"].drop_duplicates("row")
    at = position.loc[drop["row"]].to_numpy()
    at_ok = usable.to_numpy()[at]
    manifest.loc[manifest.index[at[at_ok]], "status"] = "excluded"
    manifest.loc[manifest.index[at[at_ok]], "error"] = [f"imgclf audit: {k} (see {origin})"
                                                        for k in drop["kind"].to_numpy()[at_ok]]

    relabel = findings[(findings["action"] == "relabel") & (findings["suggested"] != "")]
    relabel = relabel[~relabel["row"].isin(drop["row"])].drop_duplicates("row")
    at = position.loc[relabel["row"]].to_numpy()
    changed = manifest["label"].to_numpy()[at] != relabel["suggested"].to_numpy()
    manifest.loc[manifest.index[at[changed]], "label"] = relabel["suggested"].to_numpy()[changed]
    write_manifest(manifest, data_dir)
    return {"excluded": int(at_ok.sum()), "relabelled": int(changed.sum()), "backup": str(backup)}
