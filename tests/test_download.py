"""download_file against a real HTTP server on 127.0.0.1 (never any other address)."""
import hashlib
import http.server
import os
import socket
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from lora_min.download import DownloadError, download_file

PAYLOAD = bytes(range(256)) * 8000  # ~2 MB: several 1 MiB chunks


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; GET /truncated promises 1000 bytes, sends 10 and hangs up."""

    def do_GET(self) -> None:
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Base URL of a threaded HTTP server on 127.0.0.1 serving tmp_path/'served'."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "payload.bin").write_bytes(PAYLOAD)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_success_with_progress(server, tmp_path, capsys):
    dest = tmp_path / "out" / "payload.bin"  # parent folder is created
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    result = download_file(f"{server}/payload.bin", dest, sha256=sha, desc="payload")
    assert result == dest and dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["payload.bin"]  # no temp file left
    err = capsys.readouterr().err
    assert "payload: 100%" in err and "2.0 MB / 2.0 MB" in err and "/s" in err and err.endswith("\n")


def test_download_overwrites_existing(server, tmp_path):
    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"old")
    download_file(f"{server}/payload.bin", dest)
    assert dest.read_bytes() == PAYLOAD


def test_sha_mismatch_leaves_nothing(server, tmp_path):
    out = tmp_path / "out"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download_file(f"{server}/payload.bin", out / "payload.bin", sha256=wrong)
    message = str(info.value)
    assert "sha256 mismatch" in message and str(out / "payload.bin") in message
    assert wrong in message and hashlib.sha256(PAYLOAD).hexdigest() in message
    assert not out.exists()  # not even the folder made for it


def test_sha_mismatch_keeps_previous_file(server, tmp_path):
    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(DownloadError):
        download_file(f"{server}/payload.bin", dest, sha256="0" * 64)
    assert dest.read_bytes() == b"previous good copy"


def test_truncated_response_errors_and_leaves_nothing(server, tmp_path):
    url = f"{server}/truncated"
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "t.bin", timeout=5)
    message = str(info.value)
    assert "truncated" in message and url in message and str(tmp_path / "t.bin") in message
    assert "10 of 1000 bytes" in message
    assert leftovers(tmp_path) == ["served"]


def test_http_404_is_download_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{server}/missing.bin", tmp_path / "m.bin", hint="Fetch it yourself.")
    assert leftovers(tmp_path) == ["served"]


def test_connection_refused_fails_fast_with_hint(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/model.safetensors"
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "model.safetensors", hint="Download it by hand.")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert url in message and message.endswith("Download it by hand.")
    assert leftovers(tmp_path) == []


def test_failed_download_leaves_no_new_folders(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kept.txt").write_text("was here before")
    url = f"http://127.0.0.1:{closed_port()}/model.safetensors"
    with pytest.raises(DownloadError):
        download_file(url, tmp_path / "cache" / "gpt2" / "sub" / "model.safetensors")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["cache", "cache/kept.txt"]


def test_silent_server_times_out(tmp_path):
    """A server that accepts the connection but never answers: `timeout` bounds the wait."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel completes the handshake; nobody ever replies
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
        started = time.monotonic()
        with pytest.raises(DownloadError, match="timed out"):
            download_file(url, tmp_path / "x", timeout=0.5)
        assert time.monotonic() - started < 5
    assert leftovers(tmp_path) == []


def test_file_url(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    dest = download_file(source.as_uri(), tmp_path / "copy.bin",
                         sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD
    umask = os.umask(0o022)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0o600


def test_missing_file_url(tmp_path):
    with pytest.raises(DownloadError, match="missing.bin"):
        download_file((tmp_path / "missing.bin").as_uri(), tmp_path / "copy.bin")
    assert leftovers(tmp_path) == []
