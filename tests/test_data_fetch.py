"""`fetch` against a loopback HTTP server on 127.0.0.1 serving fixtures (SPEC §10): progress,
verification, interrupted downloads that leave nothing `check` accepts, resume with Range."""
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from _data_fixtures import md5, ptb_spec, snapshot, write_idx_dataset, WORDS
from sab.data import (BadFileError, ChecksumError, DownloadError, check, fetch, locate,
                      ptb_words_to_chars)


class Server:
    """Serves `files` (URL path -> bytes). `drop_after[path] = n`: announce the full length,
    send n bytes, close the connection. `ranges`: honour Range requests. `seen` records the
    Range header of each request."""

    def __init__(self):
        self.files, self.drop_after, self.ranges, self.seen = {}, {}, True, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = server.files.get(self.path)
                rng = self.headers.get("Range")
                server.seen.append((self.path, rng))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and server.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.drop_after.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


def _publish(server, tmp_path):
    """An IDX fixture dataset whose canonical URLs point at the loopback server."""
    src = tmp_path / "src"
    spec, arrays = write_idx_dataset(src, url_base=server.base + "/tiny/")
    for slot in spec.layouts[0].slots:
        fs = slot.canonical
        server.files["/tiny/" + fs.name] = (src / fs.path).read_bytes()
    return spec, {"tiny": spec}


def test_fetch_downloads_and_verifies(server, tmp_path, capsys):
    spec, reg = _publish(server, tmp_path)
    root = tmp_path / "root"
    paths = fetch("tiny", root, registry=reg, progress=True, log=lambda s: None)
    assert len(paths) == 4 and check(root, registry=reg).status("tiny").state == "ok"
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err  # tqdm bar on stderr
    assert not list(root.rglob("*.part"))
    # a second fetch finds everything in place and downloads nothing
    n = len(server.seen)
    fetch("tiny", root, registry=reg, log=lambda s: None)
    assert len(server.seen) == n


def test_interrupted_download_then_resume(server, tmp_path):
    spec, reg = _publish(server, tmp_path)
    root = tmp_path / "root"
    path = "/tiny/train-images-idx3-ubyte.gz"
    server.drop_after[path] = 1000
    with pytest.raises(DownloadError, match="resume"):
        fetch("tiny", root, registry=reg, progress=False, log=lambda s: None)
    part = root / "tiny" / "train-images-idx3-ubyte.gz.part"
    assert part.stat().st_size == 1000
    assert not (root / "tiny" / "train-images-idx3-ubyte.gz").exists()
    assert check(root, registry=reg).status("tiny").state == "missing"  # never "ok"
    fetch("tiny", root, registry=reg, progress=False, log=lambda s: None)
    assert (path, "bytes=1000-") in server.seen
    files = locate("tiny", root, registry=reg)
    assert files["train_images"].read_bytes() == server.files[path]
    assert not part.exists()


def test_server_without_range_restarts_cleanly(server, tmp_path):
    spec, reg = _publish(server, tmp_path)
    root = tmp_path / "root"
    server.ranges = False
    server.drop_after["/tiny/t10k-images-idx3-ubyte.gz"] = 500
    with pytest.raises(DownloadError):
        fetch("tiny", root, registry=reg, progress=False, log=lambda s: None)
    fetch("tiny", root, registry=reg, progress=False, log=lambda s: None)
    assert check(root, registry=reg).status("tiny").state == "ok"


def test_stale_part_longer_than_file_restarts(server, tmp_path):
    spec, reg = _publish(server, tmp_path)
    root = tmp_path / "root"
    part = root / "tiny" / "train-labels-idx1-ubyte.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 100_000)  # server answers 416
    fetch("tiny", root, registry=reg, progress=False, log=lambda s: None)
    assert check(root, registry=reg).status("tiny").state == "ok"


def test_wrong_checksum_is_discarded(server, tmp_path):
    spec, reg = _publish(server, tmp_path)
    root = tmp_path / "root"
    path = "/tiny/train-labels-idx1-ubyte.gz"
    good = server.files[path]
    server.files[path] = bytes([good[0] ^ 1]) + good[1:]  # same size, wrong bytes
    with pytest.raises(ChecksumError) as e:
        fetch("tiny", root, registry=reg, progress=False, log=lambda s: None)
    assert md5(good) in str(e.value) and md5(server.files[path]) in str(e.value)
    assert not (root / "tiny" / "train-labels-idx1-ubyte.gz").exists()
    assert not list(root.rglob("*.part"))
    assert check(root, registry=reg).status("tiny").state == "missing"


def test_fetch_leaves_existing_bad_file_alone(server, tmp_path):
    spec, reg = _publish(server, tmp_path)
    root = tmp_path / "root"
    bad = root / "tiny" / "t10k-labels-idx1-ubyte.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b garbage")
    before = snapshot(bad)
    with pytest.raises(BadFileError, match="left untouched"):
        fetch("tiny", root, registry=reg, progress=False, log=lambda s: None)
    assert snapshot(bad) == before and server.seen == []


def test_url_override_is_a_mirror_base(server, tmp_path):
    spec, reg = _publish(server, tmp_path)
    for name in list(server.files):
        server.files[name.replace("/tiny/", "/mirror/")] = server.files.pop(name)
    fetch("tiny", tmp_path / "root", server.base + "/mirror/", registry=reg, progress=False,
          log=lambda s: None)
    assert {p for p, _ in server.seen} == {"/mirror/" + s.canonical.name
                                           for s in spec.layouts[0].slots}


def test_http_error_is_clear(server, tmp_path):
    spec, reg = _publish(server, tmp_path)
    server.files.clear()
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch("tiny", tmp_path / "root", registry=reg, progress=False, log=lambda s: None)


def test_fetch_members_of_an_archive(server, tmp_path):
    """PTB char comes inside simple-examples.tgz: download it once, extract the three files."""
    texts = {s: ptb_words_to_chars(w).encode() for s, w in WORDS.items()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for s, data in texts.items():
            info = tarfile.TarInfo(f"simple-examples/data/ptb.char.{s}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    server.files["/rnnlm/simple-examples.tgz"] = buf.getvalue()
    reg = {"tinyptb": ptb_spec("tinyptb", texts, server.base + "/rnnlm/simple-examples.tgz")}
    root = tmp_path / "root"
    fetch("tinyptb", root, registry=reg, progress=False, log=lambda s: None)
    assert len(server.seen) == 1  # one archive for three files
    files = locate("tinyptb", root, registry=reg)
    assert {k: p.read_bytes() for k, p in files.items()} == texts
