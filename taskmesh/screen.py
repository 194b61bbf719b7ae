"""Fitting a full-screen view into a fixed terminal size, for the dashboard.

rich wraps and grows content to fit it; a full-screen view must instead decide what to leave out.
Everything here produces one-line rows, so a layout can count lines before it renders:

- ``Col`` and ``fit_table``: a borderless table keeping columns by priority while they fit.
- ``Section`` and ``stack``: blocks (heading, column header, rows) given lines by priority.
- ``spark_lines``: a unicode block sparkline of any height.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

SPARK = " ▁▂▃▄▅▆▇█"


def spark_lines(values: Sequence[float | None], rows: int, style: str = "cyan") -> list[Text]:
    """A sparkline ``rows`` lines tall (8 levels a line), scaled from 0 to the largest value.

    ``None`` (nothing known yet) stays blank; any value above 0 shows at least the lowest block,
    so a trickle of work is never drawn as idle."""
    top = max((v for v in values if v is not None), default=0.0)
    heights = [
        0 if v is None or v <= 0 or top <= 0 else max(1, round(v / top * rows * 8)) for v in values
    ]
    lines = []
    for row in range(rows):
        floor = (rows - 1 - row) * 8
        chars = "".join(SPARK[min(max(h - floor, 0), 8)] for h in heights)
        lines.append(Text(chars, style=style, no_wrap=True, overflow="crop"))
    return lines


@dataclass(frozen=True, slots=True)
class Col:
    header: str
    priority: int  # columns are kept in priority order (lowest first) while they fit
    justify: Literal["left", "right"] = "left"
    flexible: int = 0  # > 0: takes the width left over, at least this much; ellipsized


def fit_table(cols: Sequence[Col], rows: Sequence[Sequence[Text]], width: int) -> Table:
    """A borderless table of one-line rows with the columns that fit ``width``, by priority.

    No cell wraps, so the table is exactly one header line plus one line a row."""
    natural = [max([len(c.header), *(row[i].cell_len for row in rows)]) for i, c in enumerate(cols)]
    keep: list[int] = []
    used = -1  # one space between columns, none at the edges
    for i in sorted(range(len(cols)), key=lambda i: cols[i].priority):
        need = (min(natural[i], cols[i].flexible) if cols[i].flexible else natural[i]) + 1
        if used + need > width:
            break
        keep.append(i)
        used += need
    # a flexible column's room beats lower-priority columns until it has twice its minimum
    flex = next((i for i in keep if cols[i].flexible), None)
    if flex is not None:
        wanted = min(natural[flex], 2 * cols[flex].flexible) - cols[flex].flexible
        while width - used < wanted and cols[keep[-1]].priority > cols[flex].priority:
            used -= natural[keep.pop()] + 1
    keep.sort()
    table = Table(
        box=None,
        pad_edge=False,
        expand=flex is not None,  # only a flexible column absorbs spare width
        header_style="bold",
        show_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for i in keep:
        table.add_column(
            cols[i].header,
            justify=cols[i].justify,
            no_wrap=True,
            overflow="ellipsis",
            ratio=1 if cols[i].flexible else None,
            min_width=None if cols[i].flexible else natural[i],
        )
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


def two_sided(left: Text, right: Text) -> Table:
    """One line: ``left`` ellipsized as needed, ``right`` always whole at the right edge."""
    grid = Table.grid(expand=True)
    grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    grid.add_column(no_wrap=True, justify="right")
    grid.add_row(left, right)
    return grid


def heading(title: str, detail: str = "") -> Text:
    text = Text(title, style="bold magenta", no_wrap=True, overflow="ellipsis")
    if detail:
        text.append(f"  {detail}", style="dim")
    return text


@dataclass(frozen=True, slots=True)
class Section:
    """A block of the screen: a heading, maybe a column header, then up to ``need`` rows."""

    overhead: int  # lines it takes whatever its rows (heading, column header)
    need: int  # rows it could use
    least: int  # rows without which it is not worth showing
    draw: Callable[[int], list[RenderableType]] = field(compare=False)


def table_section(
    title: str,
    detail: str,
    cols: Sequence[Col],
    rows: Sequence[Sequence[Text]],
    width: int,
    what: str,
    least: int,
) -> Section:
    """A titled ``fit_table``; given fewer lines than rows, its last line counts the rest."""
    if not rows:
        return Section(1, 0, 0, lambda _n: [heading(title, f"{detail}  (none yet)")])

    def draw(n: int) -> list[RenderableType]:
        shown = rows if n >= len(rows) else rows[: max(n - 1, 0)]
        out: list[RenderableType] = [heading(title, detail), fit_table(cols, shown, width)]
        if len(shown) < len(rows):
            hidden = len(rows) - len(shown)
            out.append(Text(f"… {hidden} more {what}", style="dim italic", no_wrap=True))
        return out

    return Section(2, len(rows), min(least, len(rows)), draw)


def allocate(sections: Sequence[Section], budget: int) -> list[int | None]:
    """Rows per section (``None``: dropped) for ``budget`` lines; sections in priority order.

    Each section first gets its least useful size, if that still fits; then the lines left go,
    again in priority order, to the sections that could show more."""
    rows: list[int | None] = []
    for s in sections:
        cost = s.overhead + s.least
        if cost <= budget:
            rows.append(s.least)
            budget -= cost
        else:
            rows.append(None)
    for i, s in enumerate(sections):
        given = rows[i]
        if given is not None and budget > 0:
            extra = min(s.need - given, budget)
            rows[i] = given + extra
            budget -= extra
    return rows


def stack(sections: Sequence[Section], budget: int) -> list[RenderableType]:
    """The sections that fit in ``budget`` lines, with a blank line above each if there is room."""
    chosen = [
        (s, n) for s, n in zip(sections, allocate(sections, budget), strict=True) if n is not None
    ]
    spare = budget - sum(s.overhead + n for s, n in chosen)
    out: list[RenderableType] = []
    for section, n in chosen:
        if spare >= len(chosen):
            out.append(Text(""))
        out.extend(section.draw(n))
    return out


__all__ = [
    "SPARK",
    "Col",
    "Section",
    "allocate",
    "fit_table",
    "heading",
    "spark_lines",
    "stack",
    "table_section",
    "two_sided",
]
