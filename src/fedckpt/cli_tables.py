"""The tables of ``fedckpt ls`` and ``fedckpt status``: rich's where rich is installed, plain text otherwise.

rich is not a core dependency (it comes with ``fedckpt[bench]``), and the commands that inspect
checkpoints and writer pools must work on a bare install, such as a login node that only reads a
copy of the checkpoints. Both renderings show the same title, columns and cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One column: its header, whether its cells are right-aligned (numbers), and whether it is the
    column kept whole on a narrow terminal (``ls``'s path; the others give way)."""

    name: str
    right: bool = False
    keep_whole: bool = False


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], compact: bool = False) -> None:
    """Print ``rows`` (one string per column) under ``title``; ``compact``: with rich, no padding at
    the table's edges and no cell wrapped (``status``'s short figures)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        print(plain_table(title, columns, rows))
        return
    _print_rich(title, columns, rows, compact)


def plain_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> str:
    """The table as aligned text: the title, the headers, a rule, then one line per row."""
    widths = [max([len(column.name), *(len(row[index]) for row in rows)]) for index, column in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            cell.rjust(width) if column.right else cell.ljust(width)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        )
        return "  ".join(aligned).rstrip()

    return "\n".join(
        [title, line([column.name for column in columns]), line(["-" * width for width in widths])]
        + [line(row) for row in rows]
    )


def _print_rich(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], compact: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=not compact)
    for index, column in enumerate(columns):
        if column.keep_whole:
            # On a narrow terminal the other columns give way: this one is what the user needs whole.
            longest = max((len(row[index]) for row in rows), default=len(column.name))
            table.add_column(column.name, min_width=min(longest, console.width // 2), overflow="fold")
        else:
            table.add_column(column.name, justify="right" if column.right else "left", no_wrap=compact)
    for row in rows:
        table.add_row(*row)
    console.print(table)
