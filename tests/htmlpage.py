"""An HTML page read back the way a test needs it, with the standard library's parser only."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """The page as the tests read it: each table by its id (rows of cell texts), every tag
    and attribute seen, and the classes of the waterfall's bars."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.bars: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "div" and (a.get("class") or "").startswith("bar "):
            self.bars.append((a.get("class") or "").split()[1])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table: str) -> list[dict[str, str]]:
        """A table with a header row, as one dict per row."""
        head, *body = self.tables[table]
        return [dict(zip(head, row, strict=True)) for row in body]

    def by(self, table: str, column: str) -> dict[str, dict[str, str]]:
        return {row[column]: row for row in self.rows(table)}

