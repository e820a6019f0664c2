"""`sg.load("owner/name")`: Hugging Face Hub ids through huggingface_hub.

No network here: a local stand-in for the Hub's HTTP API (HF_ENDPOINT-style,
on 127.0.0.1) serves a tiny checkpoint, huggingface_hub's own
`snapshot_download` lays out its cache, and a child process with
HF_HUB_OFFLINE=1 loads the id from that cache (huggingface_hub reads its
environment when imported, hence the child)."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
from conftest import subprocess_env
from textfixtures import saved_model_dir  # noqa: F401 (fixture)

import streamgemma as sg

REPO = "acme/tiny-griffin"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_handler(repo: str, folder: Path):
    """Answers the requests `snapshot_download` makes: revision info, the file
    tree, then HEAD and GET of each file."""
    files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body: bytes, head: bool, **headers: str) -> None:
            self.send_response(200)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def answer(self, head: bool) -> None:
            path = urllib.parse.urlparse(self.path).path
            if path.startswith(f"/api/models/{repo}/revision/"):
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                return self.reply(json.dumps(info).encode(), head)
            if path.startswith(f"/api/models/{repo}/tree/"):
                tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in files.items()]
                return self.reply(json.dumps(tree).encode(), head)
            name = path.removeprefix(f"/{repo}/resolve/").partition("/")[2]
            if path.startswith(f"/{repo}/resolve/") and name in files:
                return self.reply(files[name], head, **{"X-Repo-Commit": COMMIT,
                                                        "ETag": f'"{hashlib.sha1(files[name]).hexdigest()}"'})
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            self.answer(head=False)

        def do_HEAD(self):
            self.answer(head=True)

    return Handler


def test_a_hub_id_loads_from_the_huggingface_cache_offline(saved_model_dir, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), hub_handler(REPO, saved_model_dir))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cached = huggingface_hub.snapshot_download(REPO, cache_dir=tmp_path / "hf" / "hub",
                                                   endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert Path(cached, "model.safetensors").is_file()

    code = f"""
import streamgemma as sg
print(sg.load({REPO!r}, device="cpu").fingerprint)
try:
    sg.load("acme/never-downloaded")
except sg.CheckpointError as e:
    print(e)
"""
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    fingerprint, error = done.stdout.splitlines()
    assert fingerprint == sg.load(saved_model_dir, device="cpu").fingerprint
    assert error.startswith("acme/never-downloaded: no such local path, and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in error


def test_without_huggingface_hub_a_hub_id_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(sg.CheckpointError) as e:
        sg.load("google/recurrentgemma-2b-it")
    assert "no such file or directory" in str(e.value) and "pip install" in str(e.value)


def test_a_local_directory_wins_over_a_hub_id(monkeypatch, tmp_path, saved_model_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    sg.load(saved_model_dir).save(tmp_path / "acme" / "local")
    assert sg.load("acme/local").source == "acme/local"
    with pytest.raises(sg.CheckpointError, match="no such file or directory"):
        sg.load("acme/local/missing")  # not an id (two slashes): a path, as before
