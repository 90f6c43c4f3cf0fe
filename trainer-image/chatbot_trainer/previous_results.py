"""An output directory never shows an earlier run's success as this run's.

Before a local run starts, the results of the previous run in its output directory
(``result.json`` first, then ``details.json`` and, unless the run resumes, the model files and
``loss.png`` that ``details.json`` lists) move into ``<output>/previous-run/``, replacing an older one. Each move
is a rename, and ``result.json`` goes first, so from the first rename on nothing in the
directory claims success until this run writes its own ``result.json`` at the very end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RESULT_FILES = ("result.json", "details.json")
ASIDE_DIR = "previous-run"


def _model_files(output_dir: Path, details_path: Path) -> list[Path]:
    """The exported files a details.json names, where they lie directly in output_dir."""
    try:
        details = json.loads(details_path.read_text())
    except (OSError, ValueError):
        return []
    names = [entry.get("path") for entry in details.get("files") or [] if isinstance(entry, dict)]
    names += [details.get("modelfile"), details.get("loss_curve")]
    found = []
    for name in names:
        if isinstance(name, str) and name:
            path = output_dir / Path(name).name
            if path.is_file() and path.resolve().parent == output_dir.resolve():
                found.append(path)
    return list(dict.fromkeys(found))


def set_aside_previous_results(output_dir: Path, keep_model_files: bool = False) -> Path | None:
    """Move the previous run's results into ``output_dir/previous-run``; returns that folder,
    or None when there were none. ``keep_model_files`` leaves the model files in place (a
    resumed run that skips its finished export still points at them)."""
    present = [output_dir / name for name in RESULT_FILES if (output_dir / name).is_file()]
    if not present:
        return None
    model_files = [] if keep_model_files else _model_files(output_dir, output_dir / "details.json")
    staging = output_dir / f".{ASIDE_DIR}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for path in [*present, *model_files]:  # result.json first
        os.replace(path, staging / path.name)
    aside = output_dir / ASIDE_DIR
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(staging, aside)
    return aside
