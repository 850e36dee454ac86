"""The list layout every dataset here uses: one item a line, ``text_id <TAB> image_id <TAB> label(s)``.

``read_rows`` is the one reader (errors name the file and line); ``read_list`` gives Wiki/WebNews entries
(one 1-based integer category), scanet.data.custom parses its own label field (numbers or names, several).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scanet.io import read_text


@dataclass
class ListEntry:
    text_id: str
    image_id: str
    label: int  # 1-based as in the file


def read_rows(
    path: Path,
    expected: str = "text_id<TAB>image_id<TAB>category",
    *,
    whitespace: bool = False,
    comments: bool = False,
    header: tuple[str, ...] | None = None,
    encoding: str = "utf-8",
) -> list[tuple[int, list[str]]]:
    """(line number, 3 stripped fields) of every item line of a list file.

    ``whitespace``: fields may also be separated by spaces when a line has no tab (the Wiki release);
    ``comments``: lines starting with '#' are skipped; ``header``: a first line whose first fields are these is
    skipped. Empty lines are skipped; a file without items, a line without 3 fields or with an empty id is a
    ValueError naming ``path:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    rows = []
    for n, line in enumerate(read_text(path, "list file", encoding).splitlines(), 1):
        if not line.strip() or (comments and line.lstrip().startswith("#")):
            continue
        parts = line.split("\t") if "\t" in line or not whitespace else line.split()
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected '{expected}' (3 tab-separated fields), got {len(parts)}: {line!r}")
        parts = [p.strip() for p in parts]
        if n == 1 and header and tuple(parts[: len(header)]) == header:
            continue
        if not parts[0] or not parts[1]:
            raise ValueError(f"{path}:{n}: empty text id or image id")
        rows.append((n, parts))
    if not rows:
        raise ValueError(f"list file {path} has no items")
    return rows


def read_list(path: Path) -> list[ListEntry]:
    """Parse a ``*_txt_img_cat.list`` file (Wiki, WebNews): one 1-based integer category per line."""
    entries = []
    for n, (tid, iid, cat) in read_rows(path, whitespace=True):
        try:
            label = int(cat)
        except ValueError:
            raise ValueError(f"{path}:{n}: category {cat!r} is not an integer") from None
        if label < 1:
            raise ValueError(f"{path}:{n}: categories are 1-based, got {label}")
        entries.append(ListEntry(tid, iid, label))
    return entries
