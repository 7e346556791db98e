"""`studio index` and `studio inspect` on a small library with one bad file."""
from __future__ import annotations

from library_fixtures import small_kohya_file

from studio.cli import main


def test_index_reports_each_file_and_quarantines_the_bad_one(tmp_path, capsys):
    small_kohya_file(tmp_path / "good.safetensors", metadata={"ss_output_name": "good"})
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["index", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 added" in out and "1 quarantined" in out and "broken.safetensors: truncated" in out
    assert "1 LoRA(s) in the catalog, 1 quarantined" in out
    assert main(["index", str(tmp_path)]) == 0  # incremental: nothing new
    assert "2 unchanged" in capsys.readouterr().out


def test_inspect_prints_a_format_report_and_names_bad_files(tmp_path, capsys):
    small_kohya_file(tmp_path / "good.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    assert main(["inspect", str(tmp_path / "good.safetensors")]) == 0
    assert "kohya" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "model.ckpt")]) == 1
    err = capsys.readouterr().err
    assert "model.ckpt" in err and "pickle" in err.lower()
