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


def damage_shard(path, how):
    """Turn a good shard at path into a damaged or foreign one."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif how == "corrupt page":  # footer intact, the first data page overwritten
        body = bytearray(path.read_bytes())
        body[4:200] = bytes(196)
        path.write_bytes(bytes(body))
    else:
        table = {"no text column": {"content": ["a", "b"]}, "null texts": {"text": ["a", None, "c"]},
                 "int texts": {"text": [1, 2, 3]}}[how]
        pq.write_table(pa.table(table), path)


DAMAGE = ["truncated", "corrupt page", "no text column", "null texts", "int texts"]
DAMAGE_ERRORS = {"truncated": "cannot be read", "corrupt page": "row group 0 cannot be read", "no text column":
                 r"has no `text` column \(columns: content\)", "null texts": r"has 1 null text\(s\) in row group 0",
                 "int texts": "has a `text` column of int64, not strings"}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_or_foreign_shard_is_one_error_naming_it(tmp_path, how):
    out = tmp_path / "shards"
    dataset.build_local([_write_jsonl(tmp_path, make_docs(30))], str(out))
    shard = out / dataset.shard_name(0)
    damage_shard(shard, how)
    with pytest.raises(UserError, match=rf"^shard {shard} {DAMAGE_ERRORS[how]}.*: it is damaged or not a nanochat "
                                        r"shard; delete it and download it again with python -m nanochat.dataset, "
                                        r"or rebuild the shards with python -m nanochat.dataset --local PATH$"):
        list(dataset.parquets_iter_batched("train", data_dir=str(out)))
    # a download refetches what cannot be a shard (the null texts only show when a row group is read)
    assert dataset.is_complete_shard(str(shard)) == (how in ("corrupt page", "null texts"))


@pytest.mark.parametrize("name, body, error", [
    ("bad.jsonl", b'{"text": "fine"}\n\n{"text": "a",}\n', r"bad.jsonl:3: not valid JSON \(Expecting property name "
                                                           r"enclosed in double quotes: column 14\): fix or remove the line$"),
    ("latin1.jsonl", b'"fine"\n"caf\xe9"\n', r"latin1.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 4\)"),
    ("fake.parquet", b"this is not parquet", r"fake.parquet: not a readable parquet file \(Parquet magic bytes"),
])
def test_bad_local_input_names_file_and_line(tmp_path, name, body, error):
    (tmp_path / name).write_bytes(body)
    with pytest.raises(UserError, match=error):
        dataset.read_local_documents([str(tmp_path / name)])


def test_local_parquet_of_numbers_is_refused(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(UserError, match=r"ints.parquet: its `text` column holds int64, not strings"):
        dataset.read_local_documents([str(tmp_path / "ints.parquet")])


@pytest.mark.parametrize("args, error", [
    (["--base-url", "foo", "-n", "1"], r"^--base-url='foo' is not a URL: it must start with http://, https:// or file://$"),
    (["--base-url", "ftp://mirror/x"], "is not a URL"),
    (["-n", "-5"], r"^--num-files=-5: give a number of train shards, or -1 for all of them$"),
    (["-w", "0"], r"^--num-workers=0 must be at least 1$"),
    (["--local", "x.txt", "-n", "5", "--base-url", "http://a"],
     r"^--local builds shards from local files and downloads nothing: drop --num-files, --base-url$"),
    (["--doc-chars", "500"], r"^--doc-chars only shape the shards that --local builds: add --local PATH, or drop "
                             r"--doc-chars to download$"),
    (["--local", "x.txt", "--doc-chars", "0"], r"^--doc-chars=0 must be at least 1$"),
    (["--local", "x.txt", "--doc-chars", "-3"], r"^--doc-chars=-3 must be at least 1$"),
])
def test_cli_refuses_bad_flags_before_any_work(args, error):
    with pytest.raises(UserError, match=error):
        dataset.main(args)


@pytest.mark.parametrize("local", [True, False])
def test_output_dir_that_cannot_be_a_folder(tmp_path, local):
    (tmp_path / "a_file").write_text("x")
    src = _write_jsonl(tmp_path, make_docs(5))
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        args = ["--local", src] if local else ["-n", "1", "--base-url", "http://127.0.0.1:9"]
        with pytest.raises(UserError, match=rf"^--output-dir {out} cannot be a folder \(.*\): pass a folder you can write$"):
            dataset.main([*args, "--output-dir", str(out)])


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
    server = FlakyShardServer(climbmix_shards, fail={"shard_00001.parquet"})  # one 500, and a single attempt
    try:
        with pytest.raises(UserError, match="1 shard\\(s\\) failed .*shard_00001.*run the same command again"):
            dataset.download(3, base_url=server.url, out_dir=str(tmp_path / "d"), workers=2, attempts=1)
    finally:
        server.close()
    assert server.requests["shard_00001.parquet"] == 1
    assert sorted(os.listdir(tmp_path / "d")) == ["shard_00000.parquet", "shard_00002.parquet", "shard_06542.parquet"]


def test_a_missing_shard_fails_at_once_naming_its_url(tmp_path, climbmix_shards):
    del climbmix_shards["shard_00002.parquet"]  # the mirror answers 404: not transient, so neither retried nor "run again"
    server, empty = FlakyShardServer(climbmix_shards), FlakyShardServer({})
    try:
        with pytest.raises(UserError, match=r"/resolve/main/shard_00002.parquet answers HTTP 404 Not Found: check the address"):
            dataset.download(3, base_url=server.url, out_dir=str(tmp_path / "d"), workers=1, backoff=10)
        with pytest.raises(UserError, match=r"/resolve/main/shard_00000.parquet answers HTTP 404"):  # a wrong mirror
            dataset.download(3, base_url=empty.url, out_dir=str(tmp_path / "e"))
    finally:
        server.close()
        empty.close()
    assert server.requests["shard_00002.parquet"] == 1 and "shard_00002.parquet" not in os.listdir(tmp_path / "d")
    assert not empty.requests  # refused by the HEAD probe, before any download
    assert not [f for f in os.listdir(tmp_path / "d") if f.endswith(".tmp")]
    with pytest.raises(UserError, match=r"file://.*/nowhere/shard_00000.parquet cannot be read"):
        dataset.download(1, base_url=f"file://{tmp_path}/nowhere", out_dir=str(tmp_path / "f"))


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
    (["--base-url", "foo", "-n", "1"], "error: --base-url='foo' is not a URL"),
])
def test_cli_errors_are_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
