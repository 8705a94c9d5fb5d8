"""The `claims-table` directive: the claims ledger (book/claims.yml) as a table in the book.

The ledger is the single source: `normlab.claims` checks it against the records, and this directive
renders exactly what it says. Each row's evidence is MyST, parsed in the page that holds the directive,
so chapter links and `{cite}` roles resolve (and a broken link fails the strict build).

    ```{claims-table}
    ```
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _fmt(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _cell(lines: list[str]) -> list[str]:
    """A list-table cell: the first line after `  - `, the rest indented to match."""
    lines = lines or [""]
    return [f"  - {lines[0]}"] + [f"    {line}" if line else "" for line in lines[1:]]


def ledger_markdown(entries: list[dict]) -> list[str]:
    out = ["````{list-table}", ":header-rows: 1", ":widths: 6 28 12 54", ":class: claims-table", "",
           "* - ID", "  - Claim (paraphrased)", "  - Verdict", "  - Evidence"]
    for e in entries:
        evidence = e["evidence"].strip().splitlines()
        if e.get("source_says"):
            evidence += ["", f"*Source:* {e['source_says']}"]
        if e.get("note"):
            evidence += ["", e["note"].strip()]
        measured = e.get("measured") or {}
        if measured.get("values"):
            shown = "; ".join(f"`{k}` = {_fmt(v)}" for k, v in measured["values"].items())
            where = ", ".join(f"`{r}`" for r in measured.get("records", [])) or "counted by `normlab.claims`"
            evidence += ["", f"*Measured* ({where}): {shown}"]
        out += [f"* - {e['id']}"] + _cell([e["claim"]]) + _cell([f"**{e['verdict']}**"]) + _cell(evidence)
    return out + ["````"]


class ClaimsTable(SphinxDirective):
    has_content = False
    optional_arguments = 0

    def run(self) -> list[nodes.Node]:
        import yaml

        path = Path(self.env.srcdir) / "book" / "claims.yml"
        self.env.note_dependency(str(path))
        entries = yaml.safe_load(path.read_text())
        container = nodes.container()
        self.state.nested_parse(StringList(ledger_markdown(entries), source=str(path)), self.content_offset,
                                container)
        return container.children


def setup(app):
    app.add_directive("claims-table", ClaimsTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
