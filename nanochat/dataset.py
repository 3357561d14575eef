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
    """All complete shards, sorted; the last is the validation shard. Defaults to ClimbMix, else FineWeb-EDU."""
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
        pf = pq.ParquetFile(path)
        for rg in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def is_complete_shard(path):
    """A shard is complete when parquet can read its footer and it has rows; a truncated download cannot."""
    try:
        return pq.ParquetFile(path).metadata.num_rows > 0
    except Exception:
        return False


# -----------------------------------------------------------------------------
# Download

class PermanentError(Exception):
    """An HTTP answer that retrying will not change (404, 403...)."""


def fetch(url, path, attempts=5, backoff=2.0, timeout=30, check=is_complete_shard):
    """
    Stream url to path + '.tmp' and rename it to path only once complete and check(tmp) passes.
    Retries with exponential backoff; never leaves a partial file at path. Returns the size in bytes.
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
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise PermanentError(f"{url}: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, truncation (URLError is an OSError)
            error = str(e) or type(e).__name__
        if os.path.exists(tmp):
            os.remove(tmp)
        if attempt == attempts:
            raise IOError(f"{url}: failed {attempts} times, last error: {error}")
        wait = backoff * 2 ** (attempt - 1)
        print(f"{os.path.basename(path)}: attempt {attempt} failed ({error}), retrying in {wait:.1f}s", flush=True)
        time.sleep(wait)


OFFLINE_HINT = "or build shards offline with python -m nanochat.dataset --local PATH"


def check_reachable(url, timeout=10, hint=OFFLINE_HINT):
    """Fail fast, in one line, when the server cannot be reached at all (offline, DNS, firewall)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: reachable. The download itself reports HTTP errors.
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        host = urllib.parse.urlsplit(url).netloc
        raise UserError(f"cannot reach {host} ({reason}): check your internet connection, {hint}") from None


def download(num_files, dataset="climbmix", base_url=None, out_dir=None, workers=4, attempts=5, backoff=2.0):
    """Download the first num_files train shards (-1 = all) plus the validation shard, in parallel."""
    default_url, num_shards, _ = DATASETS[dataset]
    base_url = (base_url or default_url).rstrip("/")
    out_dir = out_dir or dataset_dir(dataset)
    os.makedirs(out_dir, exist_ok=True)
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
                except (IOError, PermanentError) as e:
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
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                docs += chunk_paragraphs(f.read(), doc_chars)
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
                        if not isinstance(text, str):
                            raise UserError(f"{path}:{n}: each line must be a JSON string or an object with a \"text\" string")
                        docs.append(text)
        elif path.endswith(".parquet"):
            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise UserError(f"{path} has no `text` column (columns: {', '.join(table.column_names)})")
            docs += [t for t in table.column("text").to_pylist() if t]
        else:
            raise UserError(f"--local: {path} is not a .txt, .jsonl or .parquet file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"--local found no text in {', '.join(paths)}")
    return docs


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
    existing = list_parquet_files(out_dir)
    if existing:
        raise UserError(f"{out_dir} already has {len(existing)} shards: remove them first, or pass --output-dir")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction={val_fraction} must be between 0 and 1")
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
    os.makedirs(out_dir, exist_ok=True)
    for i, shard in enumerate(shards):
        write_shard(shard, os.path.join(out_dir, shard_name(i)))
    print(f"wrote {len(shards)} shards ({len(train)} train + {len(val)} val documents) to {out_dir}", flush=True)
    return {"dir": out_dir, "shards": len(shards), "train_docs": len(train), "val_docs": len(val),
            "chars": sum(map(len, docs))}


def main(argv=None):
    parser = Flags(description="Download pretraining shards, or build them from local files.")
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="train shards to download (-1 = all); the val shard always comes too")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--dataset", choices=list(DATASETS), default="climbmix")
    parser.add_argument("--base-url", default=None, help="download from this URL instead (a mirror)")
    parser.add_argument("--output-dir", default=None, help="default: $NANOCHAT_BASE_DIR/base_data_climbmix (or base_data for fineweb-edu)")
    parser.add_argument("--local", nargs="+", metavar="PATH", help="build shards from local .txt/.jsonl/.parquet files or folders")
    parser.add_argument("--doc-chars", type=int, default=2000, help="--local: merge .txt paragraphs into documents of this many characters")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="--local: fraction of documents held out for validation")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        raise UserError(f"--num-workers={args.num_workers} must be at least 1")
    if args.local:
        out_dir = args.output_dir or dataset_dir(args.dataset)
        result = build_local(args.local, out_dir, doc_chars=args.doc_chars, val_fraction=args.val_fraction)
    else:
        result = download(args.num_files, args.dataset, args.base_url, args.output_dir, args.num_workers)
    print_result("dataset", **result)


if __name__ == "__main__":
    run_cli(main)
