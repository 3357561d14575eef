"""
Knowledge bases for retrieval-augmented chat: documents in, overlapping chunks (passages) out, and three retrievers
over them. BM25 (bm25s) matches words; dense embeds with wordllama, which ships its weights in the wheel, so search
runs offline; hybrid fuses both by reciprocal rank. A base lives in $NANOCHAT_BASE_DIR/rag/NAME/:

    chunks.jsonl   one passage per line: {"id", "title", "text", "source"}
    bm25/          the bm25s index over those passages
    dense.npy      [chunks, 256] float32 wordllama embeddings, L2-normalised (absent when built without them)
    meta.json      chunking, counts, and what each build added; written last, so a base with one is complete

    python -m scripts.rag_index --kb NAME PATH...     # build or add to a base
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from nanochat.common import UserError, check_folder_name, get_base_dir

# 100-word passages are what DPR retrieves over (Karpukhin et al. 2020) and about one Wikipedia paragraph, so a
# MuSiQue or HotpotQA paragraph stays whole; three of them (~400 tokens) leave room in a 1-2K context. The 20-word
# overlap (about a sentence) keeps a fact that straddles a boundary whole in one of the two chunks.
CHUNK_WORDS, OVERLAP_WORDS = 100, 20
RETRIEVERS = ("bm25", "dense", "hybrid")
FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet")
TEXT_FIELDS = ("text", "content", "paragraph_text")  # the first one a row has is its text
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack, Clarke & Buettcher 2009)
RRF_DEPTH = 100  # how deep into each retriever's list hybrid fuses
EMBEDDER = "wordllama l2_supercat 256d"


@dataclasses.dataclass(frozen=True)
class Passage:
    """One chunk of one document: id is f"{document id}#{chunk index}", source the file (and row) it came from."""
    id: str
    title: str
    text: str
    source: str


# -----------------------------------------------------------------------------
# Documents and chunks

def read_documents(paths):
    """
    Yield {"id", "title", "text", "source"} from .txt files (a document each, titled by the file's stem), .jsonl,
    .json (an array of rows) and .parquet files, and folders of them (walked recursively, in sorted order; other
    files in a folder are left out). A row is a document with a text, content or paragraph_text field (and optional
    id and title), a MuSiQue question (each of its paragraphs a document) or a HotpotQA one (each context entry a
    document), so a question file is also a corpus. A document without an id gets one from a hash of title and text.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = list(_input_files(paths))
    found = 0
    for file in files:
        for doc in _file_documents(file):
            found += 1
            yield doc
    if not found:
        raise UserError(f"no text found in {', '.join(map(str, paths))}: give files with non-empty documents")


def _input_files(paths):
    if not paths:
        raise UserError("no input: name .txt, .jsonl, .json or .parquet files, or folders of them")
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in FILE_TYPES)
            if not files:
                raise UserError(f"{path} holds no .txt, .jsonl, .json or .parquet files: point at the data itself")
            yield from files
        elif not path.exists():
            raise UserError(f"{path} does not exist: check the path")
        elif path.suffix.lower() not in FILE_TYPES:
            raise UserError(f"{path} is not a .txt, .jsonl, .json or .parquet file: convert it to one of those")
        else:
            yield path


def _file_documents(path):
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _document(None, path.stem, path.read_text(encoding="utf-8", errors="replace"), str(path))
        return
    for source, row in _rows(path, suffix):
        if not isinstance(row, dict):
            raise UserError(f"{source} is a JSON {type(row).__name__}, not an object: one document per row")
        if isinstance(row.get("paragraphs"), list):  # MuSiQue
            for p in row["paragraphs"]:
                yield from _document(None, p.get("title", ""), p.get("paragraph_text", ""), source)
        elif isinstance(row.get("context"), (list, dict)) and not any(f in row for f in TEXT_FIELDS):  # HotpotQA
            context = row["context"]
            if isinstance(context, dict):  # the hub's parquet layout: {"title": [...], "sentences": [[...]]}
                context = zip(context["title"], context["sentences"])
            for title, sentences in context:
                yield from _document(None, title, " ".join(s.strip() for s in sentences), source)
        else:
            field = next((f for f in (*TEXT_FIELDS, "context") if f in row), None)  # SQuAD's rows: context
            if field is None:
                raise UserError(f"{source} has no text, content or paragraph_text field (nor MuSiQue paragraphs or "
                                "HotpotQA context): give each row its text")
            yield from _document(row.get("id"), row.get("title") or "", row[field], source)


def _rows(path, suffix):
    """(source, row) for each row of a .jsonl, .json or .parquet file; source names the file and line or row."""
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            file = pq.ParquetFile(path)
        except pa.ArrowException as e:
            raise UserError(f"{path} is not a readable parquet file ({e}): fix or remove it") from None
        i = 0
        for batch in file.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                i += 1
                yield f"{path}:{i}", row
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        if suffix == ".json":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix or remove it") from None
            yield from ((f"{path}:{i}", row) for i, row in enumerate(rows if isinstance(rows, list) else [rows], 1))
            return
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{i}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i} is not valid JSON ({e.msg}): one object per line") from None


def _document(doc_id, title, text, source):
    """The document, or nothing when its text is empty."""
    title, text = " ".join(str(title or "").split()), " ".join(str(text or "").split())
    if text:
        if doc_id is None:
            doc_id = hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:16]
        yield {"id": str(doc_id), "title": title, "text": text, "source": source}


def _check_chunk_sizes(words, overlap):
    if not 0 <= overlap < words:
        raise UserError(f"chunks of {words} words cannot overlap by {overlap}: the overlap must be at least 0 and "
                        "less than the chunk")


def chunk_document(doc, words=CHUNK_WORDS, overlap=OVERLAP_WORDS):
    """The document as windows of `words` words, each starting `words - overlap` after the last, ending at its end."""
    _check_chunk_sizes(words, overlap)
    tokens = doc["text"].split()
    starts = range(0, max(len(tokens) - overlap, 1), words - overlap) if tokens else []
    return [Passage(f"{doc['id']}#{i}", doc["title"], " ".join(tokens[s:s + words]), doc["source"])
            for i, s in enumerate(starts)]


def format_passages(passages):
    """What the model reads as a search's output: "[1] Title: text" lines, best first."""
    if not passages:
        return "no passages found"
    return "\n".join(f"[{i}] {p.title}: {p.text}" if p.title else f"[{i}] {p.text}" for i, p in enumerate(passages, 1))


def with_passages(question, passages):
    """Single-shot RAG: the user's question with the passages found for it placed before it."""
    return f"{format_passages(passages)}\n\n{question}"


# -----------------------------------------------------------------------------
# Retrievers

def _import_bm25s():
    import bm25s
    logging.getLogger("bm25s").setLevel(logging.INFO)  # its import sets DEBUG, which prints every index it builds
    return bm25s


@functools.cache
def load_embedder():
    """wordllama from the weights inside its wheel; disable_download makes a missing file an error, never a fetch."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    import wordllama
    root.handlers[:] = handlers  # undo the logging.basicConfig(level=INFO) its import calls
    root.setLevel(level)
    return wordllama.WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def embed(texts):
    """[len(texts), 256] float32 unit vectors."""
    return np.ascontiguousarray(load_embedder().embed(list(texts), norm=True), dtype=np.float32)


def _bm25_tokens(texts):
    return _import_bm25s().tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def _index_text(p):
    return f"{p.title} {p.text}"  # the title too, as DPR does: a passage rarely repeats its subject's name


def reciprocal_rank_fusion(rankings, k=RRF_K):
    """
    Fuse ranked lists: each item scores sum(1 / (k + rank)) over the lists it is in (rank 1 is best), so agreement
    between retrievers beats one retriever's enthusiasm, and scores on different scales never mix.
    Best first; equal scores keep the order in which the items were first seen.
    """
    scores = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=lambda item: -scores[item])  # sorted is stable


class KnowledgeBase:
    """Passages with their indexes, searchable by each retriever. Make one with build() or load()."""

    def __init__(self, name, path, passages, meta, bm25, embeddings):
        self.name, self.path, self.passages, self.meta = name, path, passages, meta
        self.bm25, self.embeddings = bm25, embeddings  # embeddings: None when built without them
        self._ranked = functools.lru_cache(maxsize=4096)(self._rank)  # a server's memory stays bounded

    def __len__(self):
        return len(self.passages)

    @property
    def retrievers(self):
        """All three, or bm25 alone for a base built without dense embeddings."""
        return RETRIEVERS if self.embeddings is not None else ("bm25",)

    @staticmethod
    def folder(name):
        check_folder_name("knowledge base name", name)
        return os.path.join(get_base_dir(), "rag", name)

    @classmethod
    def load(cls, name):
        bm25s = _import_bm25s()
        path = cls.folder(name)
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise UserError(f"no knowledge base {name} at {path}: build it with python -m scripts.rag_index --kb {name} PATH...")
        damaged = f"knowledge base {name} at {path} is damaged or incomplete (an interrupted build?): remove it and " \
                  "build it again"
        try:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
            with open(os.path.join(path, "chunks.jsonl"), encoding="utf-8") as f:
                passages = [Passage(**json.loads(line)) for line in f]
            bm25 = bm25s.BM25.load(os.path.join(path, "bm25"))
            embeddings = np.load(os.path.join(path, "dense.npy")) if meta["dense"] else None
        except (OSError, ValueError, TypeError, KeyError) as e:  # a missing or cut-off file; JSON errors are ValueErrors
            raise UserError(f"{damaged} ({type(e).__name__}: {e})") from None
        counts = {len(passages), bm25.scores["num_docs"], meta["chunks"], *([] if embeddings is None else [len(embeddings)])}
        if len(counts) > 1:
            raise UserError(damaged)
        return cls(name, path, passages, meta, bm25, embeddings)

    @classmethod
    def build(cls, name, paths, chunk_words=None, overlap_words=None, dense=None):
        """
        Create the base, or add to it: documents whose id it holds already (or that came earlier in this input) are
        skipped. Chunk sizes default to the base's own (100 and 20 words for a new one); dense (None: keep the base's
        choice, True for a new one) adds wordllama embeddings for the dense and hybrid retrievers. Returns the base.
        """
        path = cls.folder(name)
        old = cls.load(name) if os.path.exists(os.path.join(path, "meta.json")) else None
        meta = old.meta if old else {"chunk_words": CHUNK_WORDS, "overlap_words": OVERLAP_WORDS, "dense": True, "builds": []}
        chunk_words = meta["chunk_words"] if chunk_words is None else chunk_words
        overlap_words = meta["overlap_words"] if overlap_words is None else overlap_words
        if old and (chunk_words, overlap_words) != (meta["chunk_words"], meta["overlap_words"]):
            raise UserError(f"knowledge base {name} is chunked in {meta['chunk_words']} words with {meta['overlap_words']} "
                            "overlapping: add to it with those sizes, or build a new base under another name")
        _check_chunk_sizes(chunk_words, overlap_words)
        if old and meta["dense"] and dense is False:
            raise UserError(f"knowledge base {name} has dense embeddings: add to it with them, or build a new base without")
        dense = meta["dense"] if dense is None else dense

        passages = list(old.passages) if old else []
        known, before = {p.id.rpartition("#")[0] for p in passages}, len(passages)
        added = skipped = 0
        for doc in read_documents(paths):
            if doc["id"] in known:
                skipped += 1
                continue
            known.add(doc["id"])
            passages.extend(chunk_document(doc, chunk_words, overlap_words))
            added += 1
        embeddings = None
        if dense:  # embed what has no embedding yet: the new chunks, or every chunk of a base built without them
            embeddings = old.embeddings if old and old.embeddings is not None else np.zeros((0, 256), np.float32)
            if len(passages) > len(embeddings):
                embeddings = np.concatenate([embeddings, embed(_index_text(p) for p in passages[len(embeddings):])])
        build = {"paths": [str(p) for p in paths], "documents_added": added, "documents_skipped": skipped,
                 "chunks_added": len(passages) - before}
        meta = {"chunk_words": chunk_words, "overlap_words": overlap_words, "dense": dense,
                "embedder": EMBEDDER if dense else None, "chunks": len(passages), "documents": len(known),
                "builds": [*meta["builds"], build]}
        _save(path, passages, embeddings, meta, reindex=old is None or len(passages) > before)
        return cls.load(name)

    def search(self, query, k=3, retriever="bm25"):
        """
        The k passages best for query, best first (fewer when BM25 finds fewer sharing a word with it). Ties keep
        chunk order, so results are deterministic; they are memoised, so asking again (for citations) recomputes nothing.
        """
        if retriever not in RETRIEVERS:
            raise UserError(f"retriever {retriever!r} is not one of {', '.join(RETRIEVERS)}")
        if k < 1:
            raise UserError(f"a search returns at least 1 passage, not {k}")
        if retriever not in self.retrievers:
            raise UserError(f"knowledge base {self.name} was built without dense embeddings: use the bm25 retriever, "
                            f"or remove {self.path} and build it again without --no-dense")
        return [self.passages[i] for i in self._ranked(query, k, retriever)]

    def _rank(self, query, k, retriever):
        if not query.strip():
            return ()
        if retriever == "bm25":
            return tuple(self._bm25_ranking(query, k))
        if retriever == "dense":
            return tuple(self._dense_ranking(query, k))
        depth = max(k, RRF_DEPTH)
        return tuple(reciprocal_rank_fusion([self._bm25_ranking(query, depth), self._dense_ranking(query, depth)])[:k])

    def _bm25_ranking(self, query, n):
        ids = self.bm25.get_tokens_ids(_bm25_tokens([query])[0])  # words the corpus never uses drop out
        if not ids:
            return []
        scores = self.bm25.get_scores_from_ids(ids)
        return [int(i) for i in np.argsort(-scores, kind="stable")[:n] if scores[i] > 0]

    def _dense_ranking(self, query, n):
        scores = self.embeddings @ embed([query])[0]  # cosine similarity: both sides are unit vectors
        return np.argsort(-scores, kind="stable")[:n].tolist()


def _save(path, passages, embeddings, meta, reindex):
    """Write the base's files, meta.json last: a build killed half way leaves no meta.json, or the old one with counts
    that no longer match (load says so)."""
    bm25s = _import_bm25s()
    os.makedirs(path, exist_ok=True)
    if reindex:
        with open(os.path.join(path, "chunks.jsonl.tmp"), "w", encoding="utf-8") as f:
            for p in passages:
                f.write(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n")
        os.replace(os.path.join(path, "chunks.jsonl.tmp"), os.path.join(path, "chunks.jsonl"))
        bm25 = bm25s.BM25()
        bm25.index(_bm25_tokens(_index_text(p) for p in passages), show_progress=False)
        shutil.rmtree(os.path.join(path, "bm25"), ignore_errors=True)
        bm25.save(os.path.join(path, "bm25"), show_progress=False)
    dense_path = os.path.join(path, "dense.npy")
    if embeddings is not None:
        np.save(dense_path + ".tmp.npy", embeddings)
        os.replace(dense_path + ".tmp.npy", dense_path)
    with open(os.path.join(path, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(path, "meta.json.tmp"), os.path.join(path, "meta.json"))


def recall_at_k(kb, pairs, k, retriever="bm25"):
    """The fraction of (query, gold title) pairs whose gold title is among the titles of the top k passages."""
    pairs = list(pairs)
    if not pairs:
        raise UserError("no (question, title) pairs to measure recall on: give a question file with supporting paragraphs")
    hits = sum(title in {p.title for p in kb.search(query, k, retriever)} for query, title in pairs)
    return hits / len(pairs)


# -----------------------------------------------------------------------------
# The chat scripts' flags

def add_kb_flags(parser, questions=False):
    """--kb, --retriever and --passages for a script that can search; questions adds --rag-data (its question set)."""
    parser.add_argument("--kb", default=None, help="knowledge base to search (built by python -m scripts.rag_index)")
    parser.add_argument("--retriever", default="bm25", choices=RETRIEVERS, help="how --kb is searched")
    parser.add_argument("--passages", type=int, default=3, help="passages each search returns")
    if questions:
        parser.add_argument("--rag-data", default="synthetic", help="question set under task_data/rag/ "
                            "(python -m dev.gen_rag_data writes synthetic)")


def open_kb(args):
    """The knowledge base --kb names, or None without it; its flags are checked before anything else loads."""
    if args.passages < 1:
        raise UserError(f"--passages={args.passages} must be at least 1")
    if args.kb is None:
        if args.retriever != "bm25" or args.passages != 3:
            raise UserError("--retriever and --passages choose how --kb is searched: give --kb NAME, or leave them out")
        return None
    kb = KnowledgeBase.load(args.kb)
    if args.retriever not in kb.retrievers:
        raise UserError(f"--retriever={args.retriever} needs dense embeddings, which knowledge base {args.kb} was built "
                        f"without: use --retriever=bm25, or remove {kb.path} and build it again without --no-dense")
    if args.retriever != "bm25":
        load_embedder()  # now, not inside the first search a server or training run makes
    return kb
