"""Pure logic of the core: ids, file names, output shaping, output selection."""

from __future__ import annotations

import pytest

from kcr_trio.core import ids, names, output
from kcr_trio.core.languages import LANGUAGES, lookup
from kcr_trio.core.model import GeneratedFile, RunResult


def test_new_ids_have_the_contract_shape() -> None:
    made = {ids.new_id() for _ in range(2000)}
    assert len(made) == 2000
    for value in made:
        assert len(value) == 21
        assert ids.is_id(value)
        assert value[0].isalnum() and value[-1].isalnum()
        assert "." not in value


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "x" * 65, "a.b", "a b", "é"])
def test_unsafe_ids_are_rejected(bad: str) -> None:
    assert not ids.is_safe_id(bad)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("my data.csv", "my_data.csv"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\win.ini", "win.ini"),
        (".bashrc", "_.bashrc"),
        ("", "_"),
        ("données_2024.csv", "données_2024.csv"),  # Unicode letters are kept (audit finding 6)
        ("数据.csv", "数据.csv"),
        ("a b\u202ec.txt", "a_b_c.txt"),  # spaces and bidi controls still become "_"
        ("😀.png", "_.png"),
        ("a/b/c.txt", "c.txt"),
        ("..", "_.."),
    ],
)
def test_sanitize_filename_follows_librechat(raw: str, clean: str) -> None:
    assert names.sanitize_filename(raw) == clean


def test_sanitize_long_names_keeps_extension_and_distinctness() -> None:
    a = names.sanitize_filename("a" * 300 + "1.csv")
    b = names.sanitize_filename("a" * 300 + "2.csv")
    assert len(a) == 255 and a.endswith(".csv") and a != b


def test_sanitize_long_unicode_names_stay_within_255_bytes_and_keep_the_extension() -> None:
    a = names.sanitize_filename("数" * 100 + ".csv")  # 304 bytes
    assert len(a.encode()) <= 255 and a.endswith(".csv") and a.startswith("数")


def test_unique_name_never_shadows() -> None:
    assert names.unique_name("same.txt", set()) == "same.txt"
    assert names.unique_name("same.txt", {"same.txt", "same-2.txt"}) == "same-3.txt"
    long = "数" * 84 + ".csv"  # 256 bytes with the suffix: cut on a character boundary
    assert len(names.unique_name(long, {long}).encode()) <= 255


def test_content_disposition_has_ascii_and_utf8_forms() -> None:
    header = names.content_disposition("résumé final.pdf")
    assert 'filename="resume_final.pdf"' in header
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20final.pdf" in header


def test_content_type_guessing() -> None:
    assert names.guess_content_type("plot.png") == "image/png"
    assert names.guess_content_type("data.csv", "application/octet-stream") == "text/csv"
    assert names.guess_content_type("x.bin", "text/plain") == "text/plain"
    assert names.guess_content_type("noext") == "application/octet-stream"


def test_languages_are_the_librechat_enum() -> None:
    assert set(LANGUAGES) == {"py", "js", "ts", "go", "java", "c", "cpp", "php", "rs", "r", "f90", "d", "bash"}
    assert lookup("JS") is LANGUAGES["js"]
    assert lookup("python") is None and lookup("c++") is None


def test_shape_output_matches_kubecoderun() -> None:
    out, err = output.shape_output(RunResult(0, "  hi  \n\n", "\x01warn\x07\n"), limit=100, timeout=30)
    assert out == "hi\n" and err == "warn"
    out, err = output.shape_output(RunResult(3, "", ""), limit=100, timeout=30)
    assert out == "" and err == "Code execution failed with exit code 3"
    out, err = output.shape_output(RunResult(124, "part", "", timed_out=True), limit=100, timeout=7)
    assert out == "part\n" and err == "Execution timed out after 7 seconds"
    out, err = output.shape_output(RunResult(1, "", "", failure="Pod was OOMKilled"), limit=100, timeout=7)
    assert err == "Pod was OOMKilled"


def test_output_is_capped_with_marker() -> None:
    out, _ = output.shape_output(RunResult(0, "x" * 5000, ""), limit=1000, timeout=1)
    assert out.startswith("x" * 1000) and "[Output truncated - size limit exceeded]" in out
    assert len(out) < 1100


def test_select_outputs_filters_and_explains() -> None:
    generated = [
        GeneratedFile("plot.png", 10),
        GeneratedFile("code.py", 10),
        GeneratedFile(".hidden", 1),
        GeneratedFile("run.sh", 1),
        GeneratedFile("big.bin", 10_000),
        *[GeneratedFile(f"f{i}.txt", 1) for i in range(5)],
    ]
    kept, notes = output.select_outputs(generated, max_files=3, max_bytes=1000)
    assert [k.name for k in kept] == ["f0.txt", "f1.txt", "f2.txt"]
    assert any("big.bin" in n for n in notes)
    assert any("more than 3" in n for n in notes)


def test_select_outputs_keeps_subdirectories_and_names_every_drop() -> None:
    """Audit finding 11: nested outputs come back by relative path; nothing is dropped silently."""
    generated = [
        GeneratedFile("charts/plot.png", 10),
        GeneratedFile(".env", 1),
        GeneratedFile("sub/.cache/x", 1),
        GeneratedFile("a\\b.txt", 1),
        GeneratedFile("report\u202etxt.exe", 1),
        GeneratedFile("code.py", 1),
    ]
    kept, notes = output.select_outputs(generated, max_files=10, max_bytes=1000)
    assert [k.name for k in kept] == ["charts/plot.png"]
    text = "\n".join(notes)
    assert ".env" in text and "sub/.cache/x" in text and "hidden" in text
    assert "a\\\\b.txt" in text and "report\\u202etxt.exe" in text  # shown escaped, never raw
    assert "code.py" not in text  # the runner's own source is not an output
    many = [GeneratedFile(f".h{i}", 1) for i in range(25)]
    _, notes = output.select_outputs(many, max_files=10, max_bytes=1000)
    assert notes == [notes[0]] and notes[0].endswith("and 15 more not saved: hidden files are not returned")
