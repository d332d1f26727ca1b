"""Repository-wide pytest plumbing: record each notebook's wall time.

nbval turns every notebook cell into a test item; this plugin adds up the items' times per
notebook (kernel start included) and writes them to `build/notebook-times.json`, and the
terminal summary prints them, slowest first, with the total - so the course's run time can be
read off every test run. Under pytest-xdist the reports reach the controller, which writes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

_TIMES: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _TIMES[path] += report.duration


def pytest_sessionfinish(session):
    if not _TIMES or hasattr(session.config, "workerinput"):
        return  # nothing ran, or this is an xdist worker (the controller writes)
    out = Path(session.config.rootpath) / "build" / "notebook-times.json"
    out.parent.mkdir(exist_ok=True)
    times = dict(sorted(_TIMES.items()))
    out.write_text(json.dumps({"seconds": times, "total": round(sum(times.values()), 1)},
                              indent=1) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not _TIMES:
        return
    tr = terminalreporter
    tr.section("notebook wall times (build/notebook-times.json)")
    for path, seconds in sorted(_TIMES.items(), key=lambda kv: -kv[1]):
        tr.write_line(f"{seconds:7.1f} s  {path}")
    tr.write_line(f"{sum(_TIMES.values()):7.1f} s  total over {len(_TIMES)} notebooks")
