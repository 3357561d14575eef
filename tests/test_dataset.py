import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_docs
from nanochat import dataset
from nanochat.common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# --local: building shards from local files

def test_local_txt_jsonl_parquet_become_shards(tmp_path):
    src = tmp_path / "src"
    (src / "books").mkdir(parents=True)
    (src / "books" / "a.txt").write_text("\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(30)))
    (src / "rows.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in make_docs(50)) + "\n" + json.dumps("a bare string doc") + "\n")
    pq.write_table(pa.table({"text": make_docs(40, seed=3), "other": list(range(40))}), src / "more.parquet")
    out = tmp_path / "shards"
    result = dataset.build_local([str(src)], str(out), doc_chars=500, val_fraction=0.1)
    files = dataset.list_parquet_files(str(out))
    assert [os.path.basename(f) for f in files] == ["shard_00000.parquet", "shard_00001.parquet"]
    meta = pq.ParquetFile(files[0]).metadata
    assert pq.ParquetFile(files[0]).schema_arrow.names == ["text"]
    assert meta.row_group(0).column(0).compression == "ZSTD"
    train = [t for batch in dataset.parquets_iter_batched("train", data_dir=str(out)) for t in batch]
    val = [t for batch in dataset.parquets_iter_batched("val", data_dir=str(out)) for t in batch]
    txt_docs = dataset.chunk_paragraphs((src / "books" / "a.txt").read_text(), 500)
    assert len(train) + len(val) == len(txt_docs) + 51 + 40 == result["train_docs"] + result["val_docs"]
    assert sorted(train + val) == sorted(txt_docs + make_docs(50) + ["a bare string doc"] + make_docs(40, seed=3))
    assert len(val) == round(0.1 * len(train + val))
    assert all(len(d) <= 500 for d in txt_docs) and len(txt_docs) > 5


def test_iteration_strides_row_groups_across_ranks(tmp_path):
    out = tmp_path / "shards"
    dataset.build_local([_write_jsonl(tmp_path, make_docs(3000))], str(out))  # 3 row groups of 1024 in the train shard
    everything = [t for b in dataset.parquets_iter_batched("train", data_dir=str(out)) for t in b]
    per_rank = [[t for b in dataset.parquets_iter_batched("train", r, 3, data_dir=str(out)) for t in b] for r in range(3)]
    assert all(per_rank) and sum(map(len, per_rank)) == len(everything)
    assert sorted(sum(per_rank, [])) == sorted(everything)


def test_local_refuses_to_mix_with_existing_shards(tmp_path):
    src = _write_jsonl(tmp_path, make_docs(10))
    dataset.build_local([src], str(tmp_path / "shards"))
    with pytest.raises(UserError, match="already has 2 shards"):
        dataset.build_local([src], str(tmp_path / "shards"))
    with pytest.raises(UserError, match="does not exist"):
        dataset.build_local([str(tmp_path / "nope")], str(tmp_path / "other"))


def test_no_data_says_what_to_run():
    with pytest.raises(UserError, match="python -m nanochat.dataset -n 8"):
        dataset.split_files("train")


def _write_jsonl(tmp_path, docs):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return str(path)


# -----------------------------------------------------------------------------
# Download: a real HTTP server on 127.0.0.1 that misbehaves

class FlakyShardServer:
    """Serves shard bytes by name; answers 500 to the first `fail` requests of some shards and truncates others once."""

    def __init__(self, shards, fail=(), truncate=()):
        self.shards, self.requests = shards, Counter()
        self.fail, self.truncate = set(fail), set(truncate)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                if name not in server.shards:
                    self.send_error(404)
                    return
                if name in server.fail and server.requests[name] == 1:
                    self.send_error(500)
                    return
                body = server.shards[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.truncate and server.requests[name] == 1:
                    self.wfile.write(body[: len(body) // 2])  # then hang up early
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_HEAD(self):  # the reachability probe: not counted
                self.send_response(200 if self.path.rsplit("/", 1)[-1] in server.shards else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def shard_bytes(tmp_path, index, n_docs=20):
    path = tmp_path / f"src_{index}.parquet"
    dataset.write_shard(make_docs(n_docs, seed=index), str(path))
    return path.read_bytes()


@pytest.fixture
def climbmix_shards(tmp_path):
    """Shards 0-3 and the val shard 6542, as the real ClimbMix layout names them."""
    return {dataset.shard_name(i): shard_bytes(tmp_path, i) for i in (0, 1, 2, 3, 6542)}


def test_download_retries_and_refetches_truncated_shards(tmp_path, climbmix_shards):
    out = tmp_path / "data"
    out.mkdir()
    (out / "shard_00000.parquet").write_bytes(climbmix_shards["shard_00000.parquet"])  # complete: skipped
    (out / "shard_00001.parquet").write_bytes(climbmix_shards["shard_00001.parquet"][:100])  # truncated: refetched
    server = FlakyShardServer(climbmix_shards, fail={"shard_00002.parquet", "shard_06542.parquet"},
                              truncate={"shard_00003.parquet"})
    try:
        result = dataset.download(4, base_url=server.url, out_dir=str(out), workers=3, backoff=0.01)
    finally:
        server.close()
    assert sorted(os.listdir(out)) == sorted(climbmix_shards)  # no .tmp left behind
    for name, body in climbmix_shards.items():
        assert (out / name).read_bytes() == body
    assert server.requests["shard_00000.parquet"] == 0
    assert server.requests["shard_00001.parquet"] == 1
    assert server.requests["shard_00002.parquet"] == 2 and server.requests["shard_06542.parquet"] == 2
    assert server.requests["shard_00003.parquet"] == 2
    assert result["fetched"] == 4 and result["shards"] == 5


def test_download_gives_up_cleanly(tmp_path, climbmix_shards):
    del climbmix_shards["shard_00001.parquet"]  # the server answers 404: not retried
    server = FlakyShardServer(climbmix_shards, truncate=set())
    server.truncate = {"shard_00002.parquet"}
    try:
        with pytest.raises(UserError, match="1 shard\\(s\\) failed .*shard_00001.*run the same command again"):
            dataset.download(3, base_url=server.url, out_dir=str(tmp_path / "d"), workers=2, backoff=0.01)
    finally:
        server.close()
    assert server.requests["shard_00001.parquet"] == 1
    assert sorted(os.listdir(tmp_path / "d")) == ["shard_00000.parquet", "shard_00002.parquet", "shard_06542.parquet"]


def test_unreachable_server_fails_fast(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot reach 127.0.0.1.*--local PATH"):
        dataset.download(2, base_url=f"http://127.0.0.1:{port}", out_dir=str(tmp_path / "d"))


def test_cli_downloads_and_prints_json(tmp_path, climbmix_shards, base_dir):
    server = FlakyShardServer(climbmix_shards)
    try:
        proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2", "--base_url", server.url, "-w", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    result = last_json_line(proc.stdout)
    assert result["stage"] == "dataset" and result["fetched"] == 3
    assert sorted(os.listdir(base_dir / "base_data_climbmix")) == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]


@pytest.mark.parametrize("args, message", [
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag (see --help)"),
    (["--local", "/no/such/path"], "error: --local: /no/such/path does not exist"),
    (["--dataset", "nope"], "invalid choice"),
])
def test_cli_errors_are_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
