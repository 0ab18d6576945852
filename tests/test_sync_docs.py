"""The docs quote the fronts reports verbatim: README.md's and RESULTS.md's generated blocks match the reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks import sync_docs
from benchmarks.sync_docs import Section, replace_blocks, section_lines

REPORT = """# Fronts
## The goal: at >= 95 %
- retention: **met** by A.
- plain English: not met.

## One line per method: its own retention front
| method | gain |
|---|---|
| A (10% of input directions) | 2.0 |
| B | 1.0 |

`*`: a footnote
## Next
| C | 3.0 |
"""


def test_the_docs_generated_blocks_match_the_reports():
    # fails after a report was regenerated and the docs were not: run python -m benchmarks.sync_docs
    assert sync_docs.stale_docs(write=False) == []
    assert sync_docs.main(["--check"]) == 0


def test_a_section_gives_its_table_or_list_lines_less_the_omitted_rows():
    table = Section(Path("r.md"), "One line per method", "|", omit=("10% of",))
    assert section_lines(REPORT, table) == ["| method | gain |", "|---|---|", "| B | 1.0 |"]
    goal = Section(Path("r.md"), "The goal", "- ")
    assert section_lines(REPORT, goal) == ["- retention: **met** by A.", "- plain English: not met."]
    with pytest.raises(ValueError, match="0 sections headed '## Missing"):
        section_lines(REPORT, Section(Path("r.md"), "Missing", "|"))
    with pytest.raises(ValueError, match="no lines starting with '- '"):
        section_lines(REPORT, Section(Path("r.md"), "One line per method", "- "))


def test_replacing_blocks_rewrites_their_bodies_only_and_rejects_malformed_markers():
    block_t = "<!-- generated: t -->\n| old |\n<!-- end generated -->\n"
    doc = f"intro\n{block_t}prose\n<!-- generated: g -->\n<!-- end generated -->\n"
    synced = replace_blocks(doc, {"t": ["| new |"], "g": ["- a", "- b"]})
    assert synced == (
        "intro\n<!-- generated: t -->\n| new |\n<!-- end generated -->\nprose\n"
        "<!-- generated: g -->\n- a\n- b\n<!-- end generated -->\n"
    )
    assert replace_blocks(synced, {"t": ["| new |"], "g": ["- a", "- b"]}) == synced  # a second sync changes nothing
    with pytest.raises(ValueError, match="unknown generated block 'x'"):
        replace_blocks("<!-- generated: x -->\n<!-- end generated -->\n", {"t": []})
    with pytest.raises(ValueError, match="'t' has no '<!-- end generated -->' line"):
        replace_blocks("<!-- generated: t -->\n| old |\n", {"t": []})
    with pytest.raises(ValueError, match="starts inside block 't'"):
        replace_blocks("<!-- generated: t -->\n<!-- generated: g -->\n", {"t": [], "g": []})
    with pytest.raises(ValueError, match=r"expected each of the blocks \['g', 't'\] once, found \['t'\]"):
        replace_blocks("<!-- generated: t -->\n<!-- end generated -->\n", {"t": [], "g": []})


def test_check_names_the_stale_doc_and_a_sync_rewrites_it(tmp_path, monkeypatch, capsys):
    report, doc = tmp_path / "fronts.md", tmp_path / "README.md"
    report.write_text(REPORT)
    doc.write_text("<!-- generated: t -->\n| stale |\n<!-- end generated -->\n")
    monkeypatch.setattr(sync_docs, "ROOT", tmp_path)
    monkeypatch.setattr(sync_docs, "BLOCKS", {doc: {"t": Section(report, "Next", "|")}})
    assert sync_docs.main(["--check"]) == 1
    assert "stale generated blocks in ['README.md']" in capsys.readouterr().err
    assert "| stale |" in doc.read_text()  # --check changes nothing
    assert sync_docs.main([]) == 0
    assert doc.read_text() == "<!-- generated: t -->\n| C | 3.0 |\n<!-- end generated -->\n"
    assert sync_docs.main(["--check"]) == 0
