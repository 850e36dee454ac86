"""Image files of a dataset folder: listing them, their ids, which file stands for an id (with the quirks of
real releases noted), and finding an item's image or text file for display.

Used by the dataset preparers (scanet.data.*), the feature extractor (scanet.features) and contact sheets
(scanet.plots). Imports only scanet.io.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scanet.io import sha256_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FORMAT_OF_EXTENSION = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
SHEET_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")  # what a contact sheet looks for


def list_images(root: str | Path) -> list[str]:
    """Image files under ``root`` (recursive, by extension, case-insensitive), as sorted relative POSIX paths.

    A space before the extension (``"22 .jpg"``, seen in real data) still counts as an image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def image_id_of(relpath: str) -> str:
    """The id of an image file: its name without extension and surrounding spaces (``"cat/22 .jpg"`` -> "22")."""
    return Path(relpath).stem.strip()


def index_images(root: str | Path) -> dict[str, list[str]]:
    """image id -> relative paths of the files with that id (several when an id sits in several folders)."""
    index: dict[str, list[str]] = {}
    for rel in list_images(root):
        index.setdefault(image_id_of(rel), []).append(rel)
    return index


@dataclass
class ImageChoice:
    """Which file stands for an image id, and what was odd about it (for the preparation report)."""

    image_id: str
    path: str | None  # relative to the images folder; None: no file
    notes: list[str] = field(default_factory=list)


def resolve_image(
    index: dict[str, list[str]], image_id: str, images_dir: str | Path, preferred_folder: str | None = None
) -> ImageChoice:
    """The file for ``image_id`` in an ``index_images`` index, with notes on the quirks met:

    * a space before the extension (``"22 .jpg"``): used, noted;
    * the id in several folders: the one in ``preferred_folder`` (e.g. the folder of the item's class) is used,
      the others noted with whether they are byte-identical copies; with no preferred copy, the first in
      sorted order is used and the ambiguity noted;
    * no file at all: path None.
    """
    paths = index.get(image_id, [])
    choice = ImageChoice(image_id, None)
    if not paths:
        return choice
    preferred = [p for p in paths if preferred_folder is not None and Path(p).parent.name == preferred_folder]
    chosen = preferred[0] if preferred else paths[0]
    if len(paths) > 1:
        others = [p for p in paths if p != chosen]
        h = sha256_file(Path(images_dir) / chosen)
        same = ["identical copy" if sha256_file(Path(images_dir) / p) == h else "DIFFERENT content" for p in others]
        why = (
            f"the copy in the item's class folder {preferred_folder!r} is used"
            if preferred
            else "no copy in the item's class folder: the first in sorted order is used"
        )
        choice.notes.append(
            f"id found in {len(paths)} places; {why}: {chosen}; also "
            + ", ".join(f"{p} ({s})" for p, s in zip(others, same, strict=True))
        )
    elif preferred_folder is not None and not preferred:
        choice.notes.append(
            f"image is in folder {Path(chosen).parent.name!r}, not in the item's class folder "
            f"{preferred_folder!r}: used anyway"
        )
    if Path(chosen).stem != Path(chosen).stem.strip():
        choice.notes.append(f"file name has spaces around the id: {chosen!r}")
    choice.path = chosen
    return choice


def choose_images(images_dir: str | Path, entries, classes) -> dict[str, ImageChoice]:
    """image id -> ImageChoice for list-layout entries (1-based ``label``), the copy in the entry's class folder
    preferred (see ``resolve_image``)."""
    index = index_images(images_dir)
    return {e.image_id: resolve_image(index, e.image_id, images_dir, classes[e.label - 1]) for e in entries}


def _safe_id(item_id: str) -> bool:
    return bool(item_id) and item_id not in (".", "..") and not any(c in item_id for c in "/\\\0")


def find_image_file(root, image_id: str, category: str | None = None) -> Path | None:
    """The image file of an item if it exists: ROOT/images/<category>/<id>.<ext>, then ROOT/images/<id>.<ext>
    (ext: jpg, jpeg, png, either case). None when there is no root or no such file (contact sheets)."""
    if not root or not _safe_id(str(image_id)):
        return None
    base = Path(root) / "images"
    dirs = ([base / category] if category and _safe_id(category) else []) + [base]
    for d in dirs:
        for ext in SHEET_EXTENSIONS:
            p = d / f"{image_id}{ext}"
            if p.is_file():
                return p
    return None


def find_text_snippet(root, text_id: str, chars: int = 180) -> str | None:
    """The first characters of ROOT/texts/<id>.xml or .txt (markup removed), if the file exists."""
    import html
    import re

    if not root or not _safe_id(str(text_id)):
        return None
    for ext in (".xml", ".txt"):
        p = Path(root) / "texts" / f"{text_id}{ext}"
        if p.is_file():
            raw = p.read_text(encoding="utf-8", errors="replace")
            body = re.search(r"<text>(.*?)</text>", raw, re.DOTALL)
            txt = html.unescape(re.sub(r"<[^>]{0,200}>", " ", body.group(1) if body else raw))
            txt = " ".join(txt.split())
            return txt[:chars] + ("..." if len(txt) > chars else "")
    return None
