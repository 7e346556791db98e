"""Safety of the browser app (`app.py`): LoRA uploads (validated and indexed by the catalog, bad files quarantined
with the catalog's one-line reason, wrong types and oversized files refused) and no file outside the library and
output folders readable through the UI: handlers called directly, and the launched server's routes."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import app as appmod
from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library

PROMPT = "a round alien creature wearing a hat"
MAX_MB = 0.25  # the synthetic LoRAs are ~60 KB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def lora_row(name: str) -> list:
    return [name, 1.0, "", None, None]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A library (zorbo, hat; a real preview; a preview and a LoRA that are symlinks to files outside it), an
    output folder, a folder outside both, and an app on them (not launched)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("safety")
    lib, out, outside = tmp / "lib", tmp / "out", tmp / "outside"
    write_synthetic_library(lib, ["zorbo", "hat"], ranks=(4,), seeds=(0,), shapes=SMALL_TARGETS, name_style="concept")
    write_synthetic_library(outside, ["stripes"], ranks=(4,), seeds=(0,), shapes=SMALL_TARGETS, name_style="concept")
    write_synthetic_library(tmp / "src", ["crown", "hat"], ranks=(4,), seeds=(5,), shapes=SMALL_TARGETS,
                            name_style="concept")  # files to upload
    Image.new("RGB", (8, 8), "red").save(lib / "zorbo_r4_s0.preview.png")
    Image.new("RGB", (8, 8), "blue").save(outside / "secret.png")
    (lib / "hat_r4_s0.preview.png").symlink_to(outside / "secret.png")
    (lib / "linked.safetensors").symlink_to(outside / "stripes_r4_s0.safetensors")
    (outside / "jobs.jsonl").write_text(json.dumps({"id": "a", "prompt": "a red star", "steps": 2}) + "\n")
    out.mkdir()
    (out / "link.jsonl").symlink_to(outside / "jobs.jsonl")
    (out / "link.safetensors").symlink_to(outside / "stripes_r4_s0.safetensors")
    (out / "passwd.png").symlink_to("/etc/passwd")
    staging = out / "staging"  # a folder handlers may read (like Gradio's upload folder)
    staging.mkdir()
    studio_app = appmod.StudioApp(library=lib, out=out, device="cpu", max_upload_mb=MAX_MB)
    studio_app.warm_up()
    yield dict(app=studio_app, tmp=tmp, lib=lib, out=out, outside=outside, staging=staging)
    studio_app.close()


def catalog(studio_app, method: str, *args):
    """A catalog query on the app's Studio thread (the SQLite connection belongs to it)."""
    return studio_app.call(lambda: getattr(studio_app.studio.catalog, method)(*args))


def ok_names(studio_app) -> set[str]:
    return {e.name for e in catalog(studio_app, "all") if e.status == "ok"}


def stage(env, name: str, src: Path | None = None, data: bytes | None = None) -> str:
    path = env["staging"] / name
    if src is not None:
        shutil.copyfile(src, path)
    else:
        path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------------------------- names and paths
@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "lib/../hat_r4_s0", "~root",
                                  "C:\\Windows\\win.ini", "hat\x00", ".studio"])
def test_a_lora_is_named_never_given_by_path(env, name):
    a = env["app"]
    with pytest.raises(appmod.StudioInputError, match="not a LoRA name"):
        appmod.check_lora_name(name)
    with pytest.raises(gr.Error, match="not a LoRA name"):
        a.inspect(name)
    with pytest.raises(gr.Error, match="not a LoRA name"):
        a.add_lora("a star", [], name)
    with pytest.raises(gr.Error, match="not a LoRA name"):
        a.generate(PROMPT, [lora_row(name)], "auto", "", 0, 1, 2, 7.0, "", False, False, lambda *a, **k: None)
    assert appmod.check_lora_name(" hat_r4_s0 ") == "hat_r4_s0"


def test_the_library_path_itself_is_not_a_name(env):
    with pytest.raises(gr.Error, match="not a LoRA name"):
        env["app"].inspect(str(env["lib"] / "hat_r4_s0.safetensors"))
    with pytest.raises(gr.Error, match="not a LoRA name"):  # <lora:...> tags in the prompt too
        env["app"].generate("a star <lora:/etc/passwd:1>", [], "auto", "", 0, 1, 2, 7.0, "", False, False,
                            lambda *a, **k: None)


def test_symlinks_out_of_the_library_are_never_read(env):
    a = env["app"]
    rows, names, _ = a.library_table()
    linked = next(r for r in rows if r[0] == "linked")
    assert linked[6].startswith("refused: a link to a file outside the library")
    assert "linked" not in names["choices"] and {"zorbo_r4_s0", "hat_r4_s0"} <= set(names["choices"])
    with pytest.raises(gr.Error, match="outside the library"):
        a.inspect("linked")
    with pytest.raises(gr.Error, match="outside the library"):
        a.add_lora("a star", [], "linked")
    with pytest.raises(gr.Error, match="outside the library"):
        a.generate(PROMPT, [lora_row("linked")], "auto", "", 0, 1, 2, 7.0, "", False, False, lambda *a, **k: None)
    with pytest.raises(gr.Error, match="outside the library"):
        a.generate("a star <lora:linked:0.5>", [], "auto", "", 0, 1, 2, 7.0, "", False, False, lambda *a, **k: None)
    jobs = env["out"] / "linked_jobs.jsonl"
    jobs.write_text(json.dumps({"id": "x", "prompt": "a red star", "loras": ["linked"], "steps": 2}) + "\n")
    with pytest.raises(gr.Error, match="outside the library"):
        a.batch(str(jobs), 1, lambda *a, **k: None)
    assert not (env["out"] / "batch").exists() or not list((env["out"] / "batch").rglob("x-seed*.png"))
    # previews: the library's own is shown, a symlink pointing out is not
    _, _, _, preview = a.inspect("zorbo_r4_s0")
    assert preview is not None and preview.getpixel((0, 0)) == (255, 0, 0)
    _, _, _, preview = a.inspect("hat_r4_s0")
    assert preview is None


def test_files_outside_the_upload_library_and_output_folders_are_refused(env):
    a, out, outside = env["app"], env["out"], env["outside"]
    progress = lambda *a, **k: None  # noqa: E731
    for path in ["/etc/passwd", str(env["lib"] / "../../../../../../etc/passwd"), str(outside / "jobs.jsonl"),
                 str(out / "link.jsonl"), {"path": str(outside / "jobs.jsonl"), "meta": {"_type": "gradio.FileData"}}]:
        with pytest.raises(gr.Error, match="refused"):
            a.batch(path, 1, progress)
    for path in ["/etc/passwd", str(outside / "stripes_r4_s0.safetensors"), str(out / "link.safetensors")]:
        with pytest.raises(gr.Error, match="refused"):
            a.upload(path)
    with pytest.raises(gr.Error, match="refused"):  # the catalog database is not a job file, whatever its name
        a.batch(str(env["lib"] / ".studio" / "catalog.sqlite"), 1, progress)
    with pytest.raises(gr.Error, match="no such"):
        a.batch(str(out / "nosuch.jsonl"), 1, progress)
    assert (outside / "stripes_r4_s0.safetensors").is_file() and (outside / "jobs.jsonl").is_file()


# ----------------------------------------------------------------------------------------------- uploads
def test_a_good_upload_is_indexed(env):
    a = env["app"]
    before = ok_names(a)
    status, rows, names, _, report = a.upload(stage(env, "crown_r4_s5.safetensors", env["tmp"] / "src" /
                                                    "crown_r4_s5.safetensors"))
    assert "added **crown_r4_s5**" in status and "crown_r4_s5.safetensors" in report
    assert (a.library / "uploads" / "crown_r4_s5.safetensors").is_file()
    assert ok_names(a) == before | {"crown_r4_s5"} and "crown_r4_s5" in names["choices"]
    assert catalog(a, "get", "crown_r4_s5").trigger_words  # metadata read by the catalog


def test_an_upload_gets_a_safe_name_and_never_shadows_an_indexed_lora(env):
    a = env["app"]
    original = catalog(a, "get", "hat_r4_s0").path
    # another hat LoRA (other tensors) uploaded under the name of one already in the library
    status, *_ = a.upload(stage(env, "hat_r4_s0.safetensors", env["tmp"] / "src" / "hat_r4_s5.safetensors"))
    assert "added **hat_r4_s0-1**" in status
    assert catalog(a, "get", "hat_r4_s0").path == original
    weird = stage(env, "we ird;$(rm -rf x)`.safetensors", env["tmp"] / "src" / "hat_r4_s5.safetensors")
    with pytest.raises(gr.Error, match="same tensors as hat_r4_s0-1"):  # a duplicate is not kept
        a.upload(weird)
    for p in (a.library / "uploads").iterdir():
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", p.name) and p.parent.resolve() == a.uploads.resolve()
    assert listing(a.uploads) == ["crown_r4_s5.safetensors", "hat_r4_s0-1.safetensors"]


def _nan_copy(src: Path, dest: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(src))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(dest), metadata=metadata)


@pytest.mark.parametrize("kind, reason", [("corrupt", r"header|corrupt|truncated|not a safetensors|cannot"),
                                          ("pickled", r"pickle"),
                                          ("nan", r"NaN")])
def test_a_bad_upload_is_quarantined_with_the_catalogs_one_line_reason(env, kind, reason):
    a = env["app"]
    before = ok_names(a)
    path = env["staging"] / f"bad_{kind}.safetensors"
    if kind == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2" + os.urandom(64))
    elif kind == "pickled":
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
    else:
        _nan_copy(env["tmp"] / "src" / "crown_r4_s5.safetensors", path)
    with pytest.raises(gr.Error) as err:
        a.upload(str(path))
    message = str(err.value)
    assert "\n" not in message and f"bad_{kind}.safetensors was not added, quarantined" in message
    assert re.search(reason, message, re.IGNORECASE) and "(fix: " in message
    bad = [e for e in catalog(a, "quarantined") if e.path.name == f"bad_{kind}.safetensors"]
    assert len(bad) == 1 and bad[0].path.parent.resolve() == a.uploads.resolve()  # kept aside, never loaded
    assert ok_names(a) == before  # nothing indexed is lost
    rows, names, _ = a.library_table()
    assert any(r[0] == f"bad_{kind}" and r[6].startswith("quarantined: ") for r in rows)
    assert f"bad_{kind}" not in names["choices"]
    report, *_ = a.inspect(f"bad_{kind}")  # the reason and the fix, the file is not read again
    assert "fix:" in report
    with pytest.raises(gr.Error, match="quarantined"):
        a.generate(PROMPT, [lora_row(f"bad_{kind}")], "auto", "", 0, 1, 2, 7.0, "", False, False,
                   lambda *a, **k: None)


def test_a_fixed_file_replaces_its_quarantined_upload(env):
    a = env["app"]
    path = env["staging"] / "fixme.safetensors"
    _nan_copy(env["tmp"] / "src" / "crown_r4_s5.safetensors", path)
    with pytest.raises(gr.Error, match="NaN"):
        a.upload(str(path))
    path = env["staging"] / "fixme.safetensors"
    write_synthetic_library(env["tmp"] / "src2", ["crown"], ranks=(4,), seeds=(9,), shapes=SMALL_TARGETS,
                            name_style="concept")
    shutil.copyfile(env["tmp"] / "src2" / "crown_r4_s9.safetensors", path)
    status, *_ = a.upload(str(path))
    assert "added **fixme**" in status
    assert not [e for e in catalog(a, "quarantined") if e.path.stem == "fixme"]


def test_wrong_types_and_oversized_uploads_are_refused(env):
    a = env["app"]
    before = listing(a.uploads)
    for name in ("evil.ckpt", "evil.pt", "evil.bin", "evil.safetensors.exe", "evil"):
        with pytest.raises(gr.Error, match=r"only \.safetensors"):
            a.upload(stage(env, name, data=b"x" * 100))
    big = stage(env, "big.safetensors", data=b"\x00" * int(MAX_MB * 2**20 + 1))
    with pytest.raises(gr.Error, match="over the upload limit of 0.25 MB"):
        a.upload(big)
    with pytest.raises(gr.Error, match="choose a LoRA file"):
        a.upload(None)
    assert listing(a.uploads) == before


# ----------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(env):
    demo = env["app"].launch(port=free_port(), quiet=True, prevent_thread_lock=True)
    yield demo
    demo.close()


def test_the_server_binds_to_localhost_and_serves_only_library_and_output_files(env, server):
    requests = pytest.importorskip("requests")
    assert server.server_name == "127.0.0.1"
    base = server.local_url.rstrip("/")
    lib, out, outside = env["lib"], env["out"], env["outside"]
    refused = ["/etc/passwd", "../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd", "%2Fetc%2Fpasswd",
               f"{lib}/../../../../../../etc/passwd", f"{lib}/linked.safetensors", f"{lib}/hat_r4_s0.preview.png",
               f"{out}/passwd.png", f"{out}/link.jsonl", f"{outside}/jobs.jsonl", f"{outside}/secret.png",
               f"{lib}/.studio/catalog.sqlite", str(Path(appmod.__file__).resolve())]
    for path in refused:
        for route in ("/gradio_api/file=", "/file="):
            r = requests.get(base + route + path, timeout=30)
            assert r.status_code in (403, 404), (route, path, r.status_code)
            assert b"root:" not in r.content and b'"prompt"' not in r.content
    r = requests.get(f"{base}/gradio_api/file={lib}/zorbo_r4_s0.safetensors", timeout=30)
    assert r.status_code == 200 and r.content == (lib / "zorbo_r4_s0.safetensors").read_bytes()


def call_raw(base: str, endpoint: str, data: list) -> str:
    """POST to the HTTP API without gradio_client (which would upload a local file first), return the event stream."""
    import requests

    r = requests.post(f"{base}/gradio_api/call/{endpoint}", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    return requests.get(f"{base}/gradio_api/call/{endpoint}/{r.json()['event_id']}", timeout=120).text


def test_api_file_payloads_must_be_uploads(env, server):
    pytest.importorskip("gradio_client")
    from gradio_client import Client, handle_file

    base = server.local_url.rstrip("/")
    for path, endpoint, extra in [("/etc/passwd", "upload", []), (env["outside"] / "jobs.jsonl", "batch", [1]),
                                  (env["out"] / "link.jsonl", "batch", [1]),
                                  (env["outside"] / "stripes_r4_s0.safetensors", "upload", [])]:
        payload = {"path": str(path), "meta": {"_type": "gradio.FileData"}}
        stream = call_raw(base, endpoint, [payload, *extra])
        assert "event: error" in stream and "event: complete" not in stream, stream
    assert not list((env["out"] / "batch").rglob("a-seed0.png")) if (env["out"] / "batch").exists() else True
    client = Client(server.local_url, verbose=False, download_files=False)
    try:
        before = listing(env["app"].uploads)
        with pytest.raises(Exception, match=r"Invalid file type|only \.safetensors"):
            client.predict(handle_file(stage(env, "evil2.ckpt", data=b"x" * 100)), api_name="/upload")
        with pytest.raises(Exception):  # over --max-upload-mb: Gradio refuses the upload itself (413)
            client.predict(handle_file(stage(env, "big2.safetensors", data=b"\x00" * int(MAX_MB * 2**20 + 10))),
                           api_name="/upload")
        assert listing(env["app"].uploads) == before
    finally:
        client.close()


def test_main_binds_localhost_and_takes_auth_from_the_environment(env, monkeypatch):
    requests = pytest.importorskip("requests")
    from gradio_client import Client

    ap = appmod.parser()
    assert ap.parse_args([]).host == "127.0.0.1" and ap.parse_args([]).max_upload_mb == appmod.DEFAULT_MAX_UPLOAD_MB
    assert appmod.parse_auth("alice:se:cret") == ("alice", "se:cret")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(SystemExit):
            appmod.parse_auth(bad)
    monkeypatch.setenv(appmod.AUTH_ENV, "alice:se:cret")
    monkeypatch.setattr(appmod.StudioApp, "warm_up", lambda self: None)  # no model needed to check the login
    studio_app, demo = appmod.main(["--library", str(env["lib"]), "--out", str(env["tmp"] / "out2"),
                                    "--port", str(free_port()), "--max-upload-mb", "1"], prevent_thread_lock=True)
    try:
        assert demo.server_name == "127.0.0.1" and studio_app.max_upload_bytes == 2**20
        base = demo.local_url.rstrip("/")
        assert requests.get(f"{base}/config", timeout=30).status_code in (401, 403)
        assert requests.get(f"{base}/gradio_api/file={env['lib']}/zorbo_r4_s0.safetensors",
                            timeout=30).status_code in (401, 403)
        with pytest.raises(Exception):
            Client(demo.local_url, verbose=False)
        with pytest.raises(Exception):
            Client(demo.local_url, auth=("alice", "wrong"), verbose=False)
        client = Client(demo.local_url, auth=("alice", "se:cret"), verbose=False)
        assert [c[0] for c in client.predict(api_name="/methods")["choices"]][0] == "auto"
        client.close()
    finally:
        demo.close()
        studio_app.close()
