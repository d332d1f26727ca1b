"""Run one week's notebooks headless, in order: `make week W=3` (or `python tools/run_week.py 3`).

Each notebook executes in its own folder (as in Jupyter), a progress bar follows the cells,
and one line per notebook reports its wall time and its `Key results:` line. The executed
copies go to `build/executed/weekN/`, outside git, so the committed notebooks stay as they are.
Exit status 1 if any notebook fails (the others still run).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import ROOT, key_results  # noqa: E402


class _ProgressClient(NotebookClient):
    """A NotebookClient that advances a tqdm bar after every cell."""

    def __init__(self, nb, bar, **kw):
        super().__init__(nb, **kw)
        self._bar = bar

    async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
        try:
            return await super().async_execute_cell(cell, cell_index, *args, **kwargs)
        finally:
            self._bar.update(1)


def run_notebook(path: Path, out_dir: Path, timeout: int = 600) -> tuple[float, str | None]:
    """Execute one notebook; save the executed copy; return (seconds, key results)."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tqdm(total=len(nb.cells), desc=path.name, unit="cell", leave=False) as bar:
        client = _ProgressClient(nb, bar, timeout=timeout, kernel_name="python3",
                                 resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        finally:
            out_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out_dir / path.name)
    return time.perf_counter() - start, key_results(nb)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit() or not 1 <= int(argv[0]) <= 8:
        print("usage: python tools/run_week.py W   (W = 1..8)")
        return 2
    week = ROOT / f"week{int(argv[0])}"
    paths = sorted(week.glob("*.ipynb"))
    if not paths:
        print(f"{week.name} has no notebooks yet")
        return 0
    out_dir = ROOT / "build" / "executed" / week.name
    failed = 0
    for path in tqdm(paths, desc=week.name, unit="notebook"):
        try:
            seconds, results = run_notebook(path, out_dir)
            tqdm.write(f"ok    {path.name:<40} {seconds:6.1f} s  {results or '(no key results)'}")
        except CellExecutionError as err:
            failed += 1
            last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            tqdm.write(f"FAIL  {path.name:<40} {last}")
    print(f"{len(paths) - failed}/{len(paths)} notebooks ran; executed copies in "
          f"{out_dir.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
