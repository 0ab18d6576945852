"""Copy the fronts reports' tables and goal verdicts into README.md and RESULTS.md, so the docs quote them verbatim.

A generated block in a doc sits between two marker comments (invisible once rendered) that name it::

    <!-- generated: fronts-light-table -->
    | method (learning rates) | seeds | ...
    <!-- end generated -->

:data:`BLOCKS` says, per doc and block name, which report section the block copies and which rows it leaves out.
Run it after ``bench_fronts`` rewrote a report; ``tests/test_sync_docs.py`` fails while a block is stale::

    python -m benchmarks.sync_docs          # rewrite every block from the reports
    python -m benchmarks.sync_docs --check  # exit 1, naming the stale blocks
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import RESULTS_DIR, ROOT

BEGIN = re.compile(r"^<!-- generated: (\S+) -->$")
END = "<!-- end generated -->"


@dataclass(frozen=True)
class Section:
    """The lines of one report section that start with ``prefix`` (``|``: its table; ``- ``: its list), less any
    whose text contains one of ``omit``."""

    report: Path
    heading: str  # the start of the section's ``## `` heading
    prefix: str
    omit: tuple[str, ...] = ()


# The README keeps the one-seed input-subspace variants out of its table: RESULTS.md lists and discusses them.
README_OMITS = ("plain input subspace (10%", "plain input subspace (60%", "contrastive input subspace")
LIGHT, HEAVY = RESULTS_DIR / "fronts.md", RESULTS_DIR / "fronts_heavy.md"
TABLE, GOAL = "One line per method", "The goal"
BLOCKS = {
    ROOT / "README.md": {"fronts-light-table": Section(LIGHT, TABLE, "|", README_OMITS)},
    ROOT / "benchmarks" / "RESULTS.md": {
        "fronts-light-goal": Section(LIGHT, GOAL, "- "),
        "fronts-light-table": Section(LIGHT, TABLE, "|"),
        "fronts-heavy-goal": Section(HEAVY, GOAL, "- "),
        "fronts-heavy-table": Section(HEAVY, TABLE, "|"),
    },
}


def section_lines(report: str, section: Section) -> list[str]:
    """The lines a block copies from a report's text.

    Example:
        >>> text = "# R\\n## One line per method\\n| a |\\n| b (10%) |\\nnote\\n## Next\\n| c |\\n"
        >>> section_lines(text, Section(Path("r.md"), "One line", "|", omit=("10%",)))
        ['| a |']
    """
    lines = report.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"## {section.heading}")]
    if len(starts) != 1:
        raise ValueError(f"{section.report}: {len(starts)} sections headed '## {section.heading}...', expected one")
    body = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith(section.prefix) and not any(text in line for text in section.omit):
            body.append(line)
    if not body:
        raise ValueError(f"{section.report}: section '{section.heading}' has no lines starting with '{section.prefix}'")
    return body


def replace_blocks(doc: str, blocks: dict[str, list[str]], where: str = "doc") -> str:
    """``doc`` with each generated block's body replaced by ``blocks[name]``; every block named once, both ways.

    Example:
        >>> replace_blocks("a\\n<!-- generated: t -->\\nold\\n<!-- end generated -->\\nz\\n", {"t": ["new", "rows"]})
        'a\\n<!-- generated: t -->\\nnew\\nrows\\n<!-- end generated -->\\nz\\n'
    """
    out, seen, open_name = [], [], None
    for line in doc.splitlines(keepends=True):
        begin = BEGIN.match(line.rstrip("\n"))
        if open_name is None:
            out.append(line)
            if begin:
                open_name = begin.group(1)
                if open_name not in blocks:
                    raise ValueError(f"{where}: unknown generated block '{open_name}'; known: {sorted(blocks)}")
                seen.append(open_name)
                out.extend(f"{body}\n" for body in blocks[open_name])
        elif line.rstrip("\n") == END:
            out.append(line)
            open_name = None
        elif begin:
            raise ValueError(f"{where}: block '{begin.group(1)}' starts inside block '{open_name}'; close it first")
    if open_name is not None:
        raise ValueError(f"{where}: block '{open_name}' has no '{END}' line")
    if sorted(seen) != sorted(blocks):
        raise ValueError(f"{where}: expected each of the blocks {sorted(blocks)} once, found {seen}")
    return "".join(out)


def stale_docs(write: bool) -> list[str]:
    """The docs whose generated blocks differ from the reports (rewritten when ``write``)."""
    stale, reports = [], {}
    for doc_path, sections in BLOCKS.items():
        for section in sections.values():
            reports.setdefault(section.report, section.report.read_text())
        blocks = {name: section_lines(reports[section.report], section) for name, section in sections.items()}
        doc = doc_path.read_text()
        synced = replace_blocks(doc, blocks, where=str(doc_path))
        if synced != doc:
            stale.append(str(doc_path.relative_to(ROOT)))
            if write:
                doc_path.write_text(synced)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc's blocks are stale")
    args = parser.parse_args(argv)
    stale = stale_docs(write=not args.check)
    if args.check and stale:
        print(f"stale generated blocks in {stale}: run python -m benchmarks.sync_docs", file=sys.stderr)
        return 1
    print(f"rewrote {stale}" if stale else "every generated block matches its report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
