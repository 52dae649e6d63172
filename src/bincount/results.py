"""Small result objects that stages return: printed as a rich table, or as JSON with --json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def cell(value: Any) -> str:
    """A table cell: "-" for nothing, floats to 4 significant digits, anything else as it prints."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def csv_cell(text: str) -> str:
    """Text for a CSV cell: one starting with = + - @ tab or CR would run as a formula in Excel, LibreOffice
    or Sheets, so it gets a leading ' (OWASP's advice against CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # what it is` in a class body -> {name: "what it is"} (the source's own comments)."""
    import inspect
    import textwrap
    import io
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments, line_name = {}, {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            row, col = tok.start
            if tok.type == tokenize.NAME and row not in line_name and col == 4:
                line_name[row] = tok.string
            elif tok.type == tokenize.COMMENT and row in line_name:
                comments[line_name[row]] = tok.string.lstrip("#").strip().removeprefix("noqa").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    return {name: text for name, text in comments.items() if text}


class Result(BaseModel):
    """Base for stage results. Override `rich()` for a custom view; `--json` prints `model_dump`.

    A field's trailing comment (`seconds: float  # wall time, seconds`) becomes its description in the
    JSON Schema (docs/schemas/), unless the field sets one itself."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        changed = False
        for name, text in field_comments(cls).items():
            field = cls.model_fields.get(name)
            if field is not None and not field.description and name in cls.__annotations__:
                field.description = text
                changed = True
        if changed:
            cls.model_rebuild(force=True)

    def title(self) -> str:
        return type(self).__name__.removesuffix("Result").lower() or "result"

    def rich(self) -> Any:
        table = key_value_table(self.title())
        for key, value in self.model_dump(mode="json").items():
            if isinstance(value, (list, dict)) and len(value) > 8:
                value = f"{len(value)} entries (see --json)"
            table.add_row(key, str(value))
        return table


def key_value_table(title: str) -> Any:
    """A two-column rich table without a header: bold names on the left, values on the right."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    return table


def per_class_table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    """A rich table with a header row (for per-count breakdowns)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    return table


def plain_boxes(renderable: Any) -> Any:
    """The same output with ASCII table borders, for stdout that is not a terminal (a file, a pipe, CI)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    if isinstance(renderable, Table):
        renderable.box = box.ASCII2
        renderable.safe_box = True
        for column in renderable.columns:
            for cell in column._cells:
                plain_boxes(cell)
    elif isinstance(renderable, Group):
        for part in renderable.renderables:
            plain_boxes(part)
    return renderable
