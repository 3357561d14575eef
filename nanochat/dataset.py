"""
The pretraining data: parquet shards with one `text` column, row groups of 1024 documents, zstd-compressed,
and the last shard held out for validation.

    python -m nanochat.dataset -n 8                  # download the first 8 ClimbMix train shards + the val shard
    python -m nanochat.dataset --dataset fineweb-edu # the older FineWeb-EDU shards
    python -m nanochat.dataset --local books/ a.jsonl  # build shards from local .txt/.jsonl/.parquet (no internet)
"""

import concurrent.futures
import glob
import http.client
import json
import os
import random
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import Flags, UserError, get_base_dir, print_result, run_cli

# name -> (where the shards are served, number of shards, folder under $NANOCHAT_BASE_DIR)
# ClimbMix: NVIDIA's Nemotron-ClimbMix, repackaged as text. FineWeb-EDU: the dataset nanochat used until Mar 2026.
DATASETS = {
    "climbmix": ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6543, "base_data_climbmix"),
    "fineweb-edu": ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1823, "base_data"),
}
ROW_GROUP_SIZE = 1024  # documents per row group: the unit the loader reads and strides across ranks


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def dataset_dir(name="climbmix"):
    return os.path.join(get_base_dir(), DATASETS[name][2])


def list_parquet_files(data_dir=None):
    """
    All shards, sorted; the last is the validation shard. Defaults to ClimbMix, else FineWeb-EDU.
    Downloads land by rename, so no half-downloaded file is listed; a shard damaged since is found by open_shard.
    """
    if data_dir is None:
        for name in DATASETS:
            files = list_parquet_files(dataset_dir(name))
            if files:
                return files
        raise UserError(f"no pretraining shards under {get_base_dir()}: run python -m nanochat.dataset -n 8 "
                        "(or python -m nanochat.dataset --local PATH to build them from local text files)")
    return sorted(glob.glob(os.path.join(data_dir, "*.parquet")))


def split_files(split, data_dir=None):
    """train = every shard but the last; val = the last shard."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise UserError(f"need at least 2 shards (the last one is validation), found {len(files)} in "
                        f"{os.path.dirname(files[0]) if files else data_dir}: download or build more")
    return files[:-1] if split == "train" else files[-1:]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the texts of one row group at a time, row groups start, start+step, ... of every shard in the split."""
    for path in split_files(split, data_dir):
        pf = open_shard(path)
        for rg in range(start, pf.num_row_groups, step):
            yield read_texts(pf, rg, path)


def damaged_shard(path, problem):
    return UserError(f"shard {path} {problem}: it is damaged or not a nanochat shard; delete it and download it again "
                     "with python -m nanochat.dataset, or rebuild the shards with python -m nanochat.dataset --local PATH")


def _one_line(e, limit=120):
    return " ".join(str(e).split())[:limit] or type(e).__name__


def open_shard(path):
    """A shard's ParquetFile, its schema checked once per file: a parquet footer and a `text` column of strings."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # truncated, not parquet, unreadable
        raise damaged_shard(path, f"cannot be read ({_one_line(e)})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise damaged_shard(path, f"has no `text` column (columns: {', '.join(schema.names) or 'none'})")
    if not holds_strings(schema.field("text").type):
        raise damaged_shard(path, f"has a `text` column of {schema.field('text').type}, not strings")
    return pf


def holds_strings(arrow_type):
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def read_texts(pf, rg, path):
    """The texts of row group rg of an open_shard()ed shard; a damaged page or a null text is an error, not skipped."""
    try:
        column = pf.read_row_group(rg, columns=["text"]).column("text")
    except (pa.ArrowException, OSError) as e:
        raise damaged_shard(path, f"row group {rg} cannot be read ({_one_line(e)})") from None
    if column.null_count:  # kept by arrow, no scan of the rows
        raise damaged_shard(path, f"has {column.null_count} null text(s) in row group {rg}")
    return column.to_pylist()


def is_complete_shard(path):
    """A shard is complete when open_shard accepts it and it has rows; a truncated download is not."""
    try:
        return open_shard(path).metadata.num_rows > 0
    except UserError:
        return False


# -----------------------------------------------------------------------------
# Download

class PermanentError(UserError):
    """An answer that retrying will not change (HTTP 404, 403..., a file:// path that does not exist)."""


def fetch(url, path, attempts=5, backoff=2.0, timeout=30, check=is_complete_shard):
    """
    Stream url to path + '.tmp' and rename it to path only once complete and check(tmp) passes.
    Retries with exponential backoff; never leaves a partial file at path. Returns the size in bytes.
    Raises PermanentError at once when retrying cannot help, else a UserError after the last attempt.
    """
    tmp = path + ".tmp"
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                expected = response.headers.get("Content-Length")
                shutil.copyfileobj(response, f, length=1 << 20)
            size = os.path.getsize(tmp)
            if expected is not None and size != int(expected):
                raise IOError(f"got {size} of {expected} bytes")
            if not check(tmp):
                raise IOError("downloaded file failed its integrity check")
            os.replace(tmp, path)
            return size
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:
                _remove(tmp)
                raise PermanentError(f"{url} answers HTTP {e.code} {e.reason}: check the address") from None
            error = f"HTTP {e.code}"
        except urllib.error.URLError as e:
            if urllib.parse.urlsplit(url).scheme == "file":  # a local path: nothing transient about it
                _remove(tmp)
                raise PermanentError(f"{url} cannot be read ({e.reason}): check the address") from None
            error = str(e.reason)
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, truncation
            error = str(e) or type(e).__name__
        _remove(tmp)
        if attempt == attempts:
            raise UserError(f"{url}: failed {attempts} times, last error: {error}: check your connection and run the "
                            "same command again")
        wait = backoff * 2 ** (attempt - 1)
        print(f"{os.path.basename(path)}: attempt {attempt} failed ({error}), retrying in {wait:.1f}s", flush=True)
        time.sleep(wait)


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


OFFLINE_HINT = "or build shards offline with python -m nanochat.dataset --local PATH"


def check_reachable(url, timeout=10, hint=OFFLINE_HINT):
    """Fail fast, in one line, when the server cannot be reached at all (offline, DNS, firewall) or has no such file."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):  # a wrong address: no retry will find it
            raise PermanentError(f"{url} answers HTTP {e.code} {e.reason}: check the address, {hint}") from None
        # otherwise the server answered: reachable. The download itself reports other HTTP errors.
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        if urllib.parse.urlsplit(url).scheme == "file":
            raise PermanentError(f"{url} cannot be read ({reason}): check the address, {hint}") from None
        host = urllib.parse.urlsplit(url).netloc
        raise UserError(f"cannot reach {host} ({reason}): check your internet connection, {hint}") from None


def make_output_dir(path):
    """Create path (and its parents) for writing, or say in one line why it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file in the way, a parent that is a file, no permission
        raise UserError(f"--output-dir {path} cannot be a folder ({e.strerror}): pass a folder you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path} is not writable: pass a folder you can write")


def check_base_url(base_url):
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise UserError(f"--base-url={base_url!r} is not a URL: it must start with http://, https:// or file://")


def download(num_files=-1, dataset="climbmix", base_url=None, out_dir=None, workers=4, attempts=5, backoff=2.0):
    """Download the first num_files train shards (-1 = all) plus the validation shard, in parallel."""
    if num_files < -1:
        raise UserError(f"--num-files={num_files}: give a number of train shards, or -1 for all of them")
    if workers < 1:
        raise UserError(f"--num-workers={workers} must be at least 1")
    default_url, num_shards, _ = DATASETS[dataset]
    base_url = (base_url or default_url).rstrip("/")
    check_base_url(base_url)
    out_dir = out_dir or dataset_dir(dataset)
    make_output_dir(out_dir)
    num_train = num_shards - 1 if num_files < 0 else min(num_files, num_shards - 1)
    indices = list(range(num_train)) + [num_shards - 1]  # the last shard is always the validation shard
    todo = [i for i in indices if not is_complete_shard(os.path.join(out_dir, shard_name(i)))]
    print(f"{dataset}: {len(indices) - len(todo)}/{len(indices)} shards already in {out_dir}, fetching {len(todo)} "
          f"with {workers} workers", flush=True)
    t0, done_bytes, failures = time.time(), 0, []
    if todo:
        check_reachable(f"{base_url}/{shard_name(todo[0])}")
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fetch, f"{base_url}/{shard_name(i)}", os.path.join(out_dir, shard_name(i)),
                                   attempts, backoff): i for i in todo}
            for k, future in enumerate(concurrent.futures.as_completed(futures), 1):
                name = shard_name(futures[future])
                try:
                    done_bytes += future.result()
                except PermanentError:  # the mirror lacks this shard: no point fetching the rest
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                except UserError as e:  # retried and still failing: the others may yet arrive
                    failures.append(name)
                    print(f"[{k}/{len(todo)}] {name} FAILED: {e}", flush=True)
                    continue
                mb, dt = done_bytes / 1e6, time.time() - t0
                print(f"[{k}/{len(todo)}] {name} done | {mb:.1f} MB in {dt:.0f}s ({mb / max(dt, 1e-9):.1f} MB/s)", flush=True)
    if failures:
        raise UserError(f"{len(failures)} shard(s) failed to download ({', '.join(failures[:5])}): run the same command "
                        "again to fetch what is missing")
    return {"dir": out_dir, "shards": len(indices), "fetched": len(todo), "bytes": done_bytes,
            "seconds": round(time.time() - t0, 2)}


# -----------------------------------------------------------------------------
# Local shards (air-gapped use, the CPU demo, the tests)

def read_local_documents(paths, doc_chars=2000):
    """
    Documents from .txt (split at blank lines, paragraphs merged up to doc_chars characters),
    .jsonl (one {"text": ...} object or a JSON string per line) and .parquet (a `text` column) files.
    Folders are searched for those files.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(p for ext in ("txt", "jsonl", "parquet") for p in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"--local: {path} does not exist")
    docs = []
    for path in files:
        try:
            if path.endswith(".txt"):
                with open(path, encoding="utf-8", errors="replace") as f:
                    docs += chunk_paragraphs(f.read(), doc_chars)
            elif path.endswith(".jsonl"):
                docs += read_jsonl_texts(path)
            elif path.endswith(".parquet"):
                docs += read_parquet_texts(path)
            else:
                raise UserError(f"--local: {path} is not a .txt, .jsonl or .parquet file")
        except OSError as e:  # no permission, a damaged parquet page
            raise UserError(f"--local: cannot read {path} ({_one_line(e.strerror or e)})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"--local found no text in {', '.join(paths)}")
    return docs


def read_jsonl_texts(path):
    """One JSON string, or an object with a "text" string, per line; a bad line is named by path:line."""
    texts = []
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 can be named
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start}): convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}: column {e.colno}): fix or remove the line") from None
            text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{n}: each line must be a JSON string or an object with a \"text\" string")
            texts.append(text)
    return texts


def read_parquet_texts(path):
    """The `text` column of a local parquet file; empty and null texts are left out like blank lines."""
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise UserError(f"{path} has no `text` column (columns: {', '.join(schema.names)})")
        if not holds_strings(schema.field("text").type):
            raise UserError(f"{path}: its `text` column holds {schema.field('text').type}, not strings")
        return [t for t in pf.read(columns=["text"]).column("text").to_pylist() if t]
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable parquet file ({_one_line(e)})") from None


def chunk_paragraphs(text, doc_chars):
    """Split text at blank lines and merge consecutive paragraphs into documents of up to doc_chars characters."""
    docs, current = [], ""
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if current and len(current) + 2 + len(paragraph) > doc_chars:
            docs.append(current)
            current = ""
        current = current + "\n\n" + paragraph if current else paragraph
    if current:
        docs.append(current)
    return docs


def write_shard(docs, path):
    # A small shard gets smaller row groups, so that up to 8 ranks still each get a row group of it.
    row_group_size = min(ROW_GROUP_SIZE, -(-len(docs) // 8))
    table = pa.Table.from_pydict({"text": docs})
    pq.write_table(table, path + ".tmp", row_group_size=row_group_size, compression="zstd", compression_level=3,
                   use_dictionary=False, write_statistics=False)
    os.replace(path + ".tmp", path)


def build_local(paths, out_dir=None, doc_chars=2000, val_fraction=0.02, shard_chars=250_000_000, seed=42):
    """Shuffle local documents into train shards of ~shard_chars characters plus one held-out validation shard."""
    out_dir = out_dir or dataset_dir("climbmix")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction={val_fraction} must be between 0 and 1")
    if doc_chars < 1:
        raise UserError(f"--doc-chars={doc_chars} must be at least 1")
    make_output_dir(out_dir)
    existing = list_parquet_files(out_dir)
    if existing:
        raise UserError(f"{out_dir} already has {len(existing)} shards: remove them first, or pass --output-dir")
    docs = read_local_documents(paths, doc_chars)
    if len(docs) < 2:
        raise UserError("--local needs at least 2 documents (one for training, one for validation)")
    random.Random(seed).shuffle(docs)
    num_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    train, val = docs[:-num_val], docs[-num_val:]
    shards, current, chars = [], [], 0
    for doc in train:
        current.append(doc)
        chars += len(doc)
        if chars >= shard_chars:
            shards.append(current)
            current, chars = [], 0
    if current:
        shards.append(current)
    shards.append(val)
    for i, shard in enumerate(shards):
        write_shard(shard, os.path.join(out_dir, shard_name(i)))
    print(f"wrote {len(shards)} shards ({len(train)} train + {len(val)} val documents) to {out_dir}", flush=True)
    return {"dir": out_dir, "shards": len(shards), "train_docs": len(train), "val_docs": len(val),
            "chars": sum(map(len, docs))}


def main(argv=None):
    parser = Flags(description="Download pretraining shards, or build them from local files.")
    # download-only and --local-only flags default to None, so that a flag given to the other mode can be refused
    parser.add_argument("-n", "--num-files", type=int, default=None, help="train shards to download (default or -1: all); the val shard always comes too")
    parser.add_argument("-w", "--num-workers", type=int, default=None, help="parallel downloads (default: 4)")
    parser.add_argument("--dataset", choices=list(DATASETS), default="climbmix")
    parser.add_argument("--base-url", default=None, help="download from this URL instead (a mirror: http://, https:// or file://)")
    parser.add_argument("--output-dir", default=None, help="default: $NANOCHAT_BASE_DIR/base_data_climbmix (or base_data for fineweb-edu)")
    parser.add_argument("--local", nargs="+", metavar="PATH", help="build shards from local .txt/.jsonl/.parquet files or folders")
    parser.add_argument("--doc-chars", type=int, default=None, help="--local: merge .txt paragraphs into documents of this many characters (default: 2000)")
    parser.add_argument("--val-fraction", type=float, default=None, help="--local: fraction of documents held out for validation (default: 0.02)")
    args = parser.parse_args(argv)
    download_flags = {"--num-files": args.num_files, "--num-workers": args.num_workers, "--base-url": args.base_url}
    local_flags = {"--doc-chars": args.doc_chars, "--val-fraction": args.val_fraction}
    ignored = [flag for flag, value in (download_flags if args.local else local_flags).items() if value is not None]
    if ignored and args.local:
        raise UserError(f"--local builds shards from local files and downloads nothing: drop {', '.join(ignored)}")
    if ignored:
        raise UserError(f"{', '.join(ignored)} only shape the shards that --local builds: add --local PATH, or drop "
                        f"{', '.join(ignored)} to download")
    if args.local:
        options = {"doc_chars": args.doc_chars, "val_fraction": args.val_fraction}
        result = build_local(args.local, args.output_dir or dataset_dir(args.dataset),
                             **{k: v for k, v in options.items() if v is not None})
    else:
        options = {"num_files": args.num_files, "workers": args.num_workers}
        result = download(dataset=args.dataset, base_url=args.base_url, out_dir=args.output_dir,
                          **{k: v for k, v in options.items() if v is not None})
    print_result("dataset", **result)


if __name__ == "__main__":
    run_cli(main)
