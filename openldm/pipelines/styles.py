"""AUTOMATIC1111's prompt styles: a ``styles.csv`` with the columns ``name``, ``prompt`` and ``negative_prompt``. A
style's text takes the user's prompt where it says ``{prompt}``; without the placeholder it follows the prompt after
", ". Styles apply in the order given, the negative prompt the same way; the image's parameters then hold the
prompts as applied, so they regenerate it without the styles file."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read_styles(path: str | Path) -> dict[str, Style]:
    """The styles of an A1111 ``styles.csv`` by name (a later row of the same name wins, as in A1111). A missing or
    unreadable file, or one without a ``name`` column, raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"styles file {str(path)!r} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "name" not in reader.fieldnames:
                raise ValueError(f"styles file {str(path)!r} has no 'name' column; A1111's styles.csv starts with "
                                 "the header name,prompt,negative_prompt")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"styles file {str(path)!r} is not a UTF-8 CSV file ({e})") from None
    # A1111's older files call the prompt column "text"
    return {row["name"]: Style(row["name"], row.get("prompt", row.get("text")) or "", row.get("negative_prompt") or "")
            for row in rows if row.get("name")}


def merge(style_text: str, prompt: str) -> str:
    """``prompt`` put into one style's text."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def choose(styles: dict[str, Style], names: Sequence[str]) -> list[Style]:
    """The styles called ``names``, in order; an unknown name raises ValueError listing the known ones."""
    for name in names:
        if name not in styles:
            raise ValueError(f"no style {name!r}; the styles file has {sorted(styles)[:20] or 'none'}")
    return [styles[name] for name in names]


def apply_styles(prompt: str, negative_prompt: str, styles: Sequence[Style]) -> tuple[str, str]:
    """(prompt, negative prompt) with ``styles`` applied one after the other."""
    for style in styles:
        prompt, negative_prompt = merge(style.prompt, prompt), merge(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
