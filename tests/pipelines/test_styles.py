"""A1111's prompt styles: the merge rule (a {prompt} placeholder, or appended after ", "), styles.csv as A1111
writes it, and the errors."""
from __future__ import annotations

import pytest

from openldm.pipelines.styles import Style, apply_styles, choose, merge, read_styles


def test_a_style_takes_the_prompt_at_its_placeholder_or_follows_it():
    assert merge("ink drawing of {prompt}, high contrast", "a cat") == "ink drawing of a cat, high contrast"
    assert merge("in a frame", "a cat ") == "a cat, in a frame"
    assert merge("in a frame", "") == "in a frame"
    assert merge("", "a cat") == "a cat"
    styles = [Style("ink", "ink drawing of {prompt}", "blurry"), Style("frame", "in a frame", "")]
    assert apply_styles("a cat", "blue", styles) == ("ink drawing of a cat, in a frame", "blue, blurry")
    assert apply_styles("a cat", "", styles[::-1]) == ("ink drawing of a cat, in a frame", "blurry")


def test_styles_csv_as_a1111_writes_it(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_bytes('\ufeffname,prompt,negative_prompt\n"ink","ink drawing of {prompt}, lines","blurry, grey"\n'
                     'frame,in a frame,\nink,"ink, again {prompt}",\n'.encode())  # BOM; a later row wins
    styles = read_styles(path)
    assert list(styles) == ["ink", "frame"]
    assert styles["ink"] == Style("ink", "ink, again {prompt}", "")
    assert styles["frame"] == Style("frame", "in a frame", "")
    old = tmp_path / "old.csv"
    old.write_text("name,text\nsepia,{prompt} in sepia\n")  # the older column name
    assert read_styles(old)["sepia"].prompt == "{prompt} in sepia"
    assert choose(styles, ["frame", "ink"]) == [styles["frame"], styles["ink"]]
    with pytest.raises(ValueError, match=r"no style 'nope'.*'frame'"):
        choose(styles, ["nope"])


@pytest.mark.parametrize("content, says", [(None, "does not exist"), (b"prompt,negative_prompt\nx,y\n", "no 'name'"),
                                           (b"name,prompt\n\xff\xfe,x\n", "not a UTF-8 CSV")])
def test_a_bad_styles_file_is_named(tmp_path, content, says):
    path = tmp_path / "styles.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=says):
        read_styles(path)
