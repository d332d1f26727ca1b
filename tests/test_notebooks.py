"""Hygiene of every committed notebook, and the README table that lists them.

The notebooks themselves are executed by nbval (`make notebooks`); these checks make sure
that what a reader sees on GitHub is one real top-to-bottom run of the course's skeleton.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import notebooks as nbtools  # noqa: E402

NOTEBOOKS = nbtools.notebooks()
IDS = [str(p.relative_to(nbtools.ROOT)) for p in NOTEBOOKS]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no week*/*.ipynb found"
    assert any(p.parent.name == "week1" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_skeleton(path):
    nb = nbtools.read(path)
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and nbtools.source(first).startswith("# "), \
        "the first cell must be a markdown title"
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), "name notebooks NN_name.ipynb"
    code = nbtools.code_cells(nb)
    assert nbtools.source(code[0]) == nbtools.setup_cell(), \
        "first code cell must be the Colab set-up cell (`python tools/notebooks.py setup-cells`)"
    headings = [nbtools.source(c) for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert any(h.lstrip().startswith("## Summary") for h in headings), "no '## Summary' cell"
    assert any(h.lstrip().startswith("## Exercises") for h in headings), "no '## Exercises' cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_saved_from_one_clean_run(path):
    code = nbtools.code_cells(nbtools.read(path))
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"execution counts {counts} are not 1..{len(code)}: run the notebook top to bottom"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"saved error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_reports_key_results(path):
    assert nbtools.key_results(nbtools.read(path)), \
        f"the last code cell must print a line starting with {nbtools.KEY_RESULTS!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_week_readme_lists_notebook(path):
    readme = path.parent / "README.md"
    assert readme.exists(), f"{path.parent.name}/README.md is missing"
    assert path.stem in readme.read_text(encoding="utf-8"), f"{readme} does not list {path.name}"


def test_readme_table_is_up_to_date():
    text = (nbtools.ROOT / "README.md").read_text(encoding="utf-8")
    assert nbtools.readme_with_table(text) == text, \
        "README notebook table is out of date: run `make readme`"


def test_readme_table_lists_every_notebook_with_a_badge():
    table = nbtools.readme_table()
    for path in NOTEBOOKS:
        assert nbtools.colab_url(path) in table
    assert table.count(nbtools.COLAB_BADGE) == len(NOTEBOOKS)


def test_setup_cell_installs_from_the_one_repo_url():
    from shared import REPO_URL
    cell = nbtools.setup_cell()
    assert f"git+{REPO_URL}" in cell and 'if "google.colab" in sys.modules:' in cell
