"""`studio generate --loras`: auto (retrieval), none, or explicit names with weights."""
from studio.cli import _parse_loras, main


def test_parse_loras():
    assert _parse_loras("auto") == "auto"
    assert _parse_loras("none") is None
    assert _parse_loras("zorbo:0.8, hat") == [("zorbo", 0.8), ("hat", 1.0)]


def test_generate_auto_with_nothing_fitting(tmp_path, capsys):
    lib = tmp_path / "empty_library"
    lib.mkdir()
    code = main(["generate", "a red star on a black background", "--n", "1", "--steps", "2",
                 "--library", str(lib), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "auto-picked LoRAs: none fits this prompt" in out
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
