"""Knowledge bases and retrievers (nanochat/retrieval.py) and scripts/rag_index.py: real bm25s, real wordllama (its
weights ship in its wheel), real files in tmp_path, every base under the test's own NANOCHAT_BASE_DIR."""

import json
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import retrieval
from nanochat.common import Flags, UserError
from nanochat.retrieval import KnowledgeBase, Passage, chunk_document, format_passages, read_documents, recall_at_k
from scripts import rag_index

CORPUS = {
    "Volcano": "A volcano is a rupture in the crust of a planet that lets hot lava, volcanic ash and gases escape from "
               "a magma chamber below the surface. Eruptions can bury nearby towns.",
    "Bread": "Bread is baked from a dough of flour, water, salt and yeast. The yeast makes the dough rise before it goes "
             "into a hot oven.",
    "Chess": "Chess is a board game for two players who move kings, queens, rooks, bishops, knights and pawns on a "
             "checkered board of sixty-four squares.",
    "Photosynthesis": "Plants use photosynthesis to turn sunlight, water and carbon dioxide into sugar and oxygen inside "
                      "the chloroplasts of their leaves.",
    "Violin": "The violin is a wooden string instrument played with a bow; it is the smallest and highest-pitched member "
              "of the violin family.",
    "Glacier": "A glacier is a slow river of ice that forms where more snow falls each winter than melts each summer, "
               "carving valleys as it flows.",
}
QUERIES = {"Volcano": "where does the lava of an eruption come from", "Bread": "how does yeast make dough rise before baking",
           "Chess": "which pieces do players move in chess", "Photosynthesis": "how do plants turn sunlight into sugar",
           "Violin": "a string instrument played with a bow", "Glacier": "how does a river of ice carve valleys"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_text(path, text):
    path.write_text(text)
    return path


def write_corpus(tmp_path, titles=CORPUS):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"id": t.lower(), "title": t, "text": CORPUS[t]} for t in titles])


@pytest.fixture
def kb(tmp_path):
    return KnowledgeBase.build("test", [write_corpus(tmp_path)])


# -----------------------------------------------------------------------------
# Retrievers

@pytest.mark.parametrize("retriever", ["bm25", "dense", "hybrid"])
def test_each_retriever_puts_the_relevant_passage_first(kb, retriever):
    for title, query in QUERIES.items():
        assert kb.search(query, k=3, retriever=retriever)[0].title == title, query
    assert recall_at_k(kb, [(q, t) for t, q in QUERIES.items()], 1, retriever) == 1.0


def test_dense_finds_a_paraphrase_that_shares_no_word(kb):
    query = "mountain that explodes with molten rock"
    assert kb.search(query, 3, "bm25") == []  # BM25 returns only passages that share a word with the query
    assert kb.search(query, 3, "dense")[0].title == "Volcano"
    assert kb.search(query, 3, "hybrid")[0].title == "Volcano"


def test_rrf_rewards_agreement_and_matches_a_hand_computation():
    rrf = retrieval.reciprocal_rank_fusion
    # "both" is second in one list and first in the other; "solo" is first in one list only
    assert rrf([["solo", "both"], ["both", "other"]]) == ["both", "solo", "other"]
    # a: 1/61 + 1/63, b: 1/62 + 1/61, c: 1/63 + 1/62
    assert rrf([["a", "b", "c"], ["b", "c", "a"]]) == ["b", "a", "c"]
    assert rrf([["a", "b"], ["b", "a"]]) == ["a", "b"]  # a tie keeps the order first seen
    assert rrf([["a", "b"], ["b", "a"]], k=0) == ["a", "b"]


def test_hybrid_is_the_rrf_of_bm25_and_dense(kb):
    n = len(kb)  # the corpus is smaller than the fusion depth, so both lists are whole
    for query in [*QUERIES.values(), "ice and lava", "a hot oven"]:
        bm25, dense = kb.search(query, n, "bm25"), kb.search(query, n, "dense")
        scores = {}
        for ranking in (bm25, dense):
            for rank, p in enumerate(ranking, 1):
                scores[p.id] = scores.get(p.id, 0) + 1 / (60 + rank)
        expected = sorted(scores, key=lambda i: -scores[i])
        assert [p.id for p in kb.search(query, n, "hybrid")] == expected
        assert [p.id for p in kb.search(query, 2, "hybrid")] == expected[:2]


def test_search_is_deterministic_and_memoised(tmp_path):
    rows = [{"id": "first", "title": "Twin", "text": "the same words"}, {"id": "second", "title": "Twin", "text": "the same words"}]
    kb = KnowledgeBase.build("twins", [write_jsonl(tmp_path / "twins.jsonl", rows)])
    for retriever in ("bm25", "dense", "hybrid"):
        assert [p.id for p in kb.search("same words", 2, retriever)] == ["first#0", "second#0"]  # a tie keeps chunk order
    misses = kb._ranked.cache_info().misses
    first = kb.search("same words", 2, "hybrid")
    assert kb.search("same words", 2, "hybrid") == first and kb._ranked.cache_info().misses == misses
    assert kb.search("   ", 3, "dense") == []


def test_an_index_survives_save_and_load(kb):
    queries = [*QUERIES.values(), "ice", "mountain that explodes with molten rock"]
    before = {(q, r): kb.search(q, 4, r) for q in queries for r in retrieval.RETRIEVERS}
    loaded = KnowledgeBase.load("test")
    assert loaded is not kb and loaded.passages == kb.passages and len(loaded) == len(CORPUS)
    assert (loaded.embeddings == kb.embeddings).all() and loaded.embeddings.dtype.name == "float32"
    assert {(q, r): loaded.search(q, 4, r) for q in queries for r in retrieval.RETRIEVERS} == before
    chunks = f"{kb.path}/chunks.jsonl"  # as a build killed between writing its files would leave it
    with open(chunks) as f:
        lines = f.readlines()
    with open(chunks, "w") as f:
        f.writelines(lines[:-1])
    damaged = "^knowledge base test at .* is damaged or incomplete \\(an interrupted build\\?\\): remove it and build it again"
    with pytest.raises(UserError, match=damaged + "$"):
        KnowledgeBase.load("test")
    os.remove(f"{kb.path}/dense.npy")  # a file gone: the same line, naming what is missing
    with pytest.raises(UserError, match=damaged + r" \(FileNotFoundError: .*dense.npy"):
        KnowledgeBase.load("test")


def test_adding_skips_documents_already_there(tmp_path):
    KnowledgeBase.build("grow", [write_corpus(tmp_path, ["Volcano", "Bread"])])
    kb = KnowledgeBase.build("grow", [write_corpus(tmp_path, ["Bread", "Chess"])])  # Bread again, Chess new
    assert [p.title for p in kb.passages] == ["Volcano", "Bread", "Chess"]
    assert kb.meta["builds"][-1] == {"paths": [str(tmp_path / "corpus.jsonl")], "documents_added": 1,
                                     "documents_skipped": 1, "chunks_added": 1}
    assert kb.meta["documents"] == 3 and kb.embeddings.shape == (3, 256)
    for retriever in retrieval.RETRIEVERS:
        assert kb.search(QUERIES["Chess"], 1, retriever)[0].title == "Chess"
    with pytest.raises(UserError, match="^knowledge base grow is chunked in 100 words with 20 overlapping: add to it"):
        KnowledgeBase.build("grow", [tmp_path / "corpus.jsonl"], chunk_words=50)


def test_a_bm25_only_base_gets_embeddings_when_added_to_with_them(tmp_path):
    kb = KnowledgeBase.build("sparse", [write_corpus(tmp_path, ["Volcano", "Bread"])], dense=False)
    assert kb.embeddings is None and kb.search("lava", 1)[0].title == "Volcano"
    with pytest.raises(UserError, match="^knowledge base sparse was built without dense embeddings: use the bm25"):
        kb.search("lava", 1, "hybrid")
    kb = KnowledgeBase.build("sparse", [write_corpus(tmp_path, ["Chess"])], dense=True)
    assert kb.embeddings.shape == (3, 256) and kb.search("molten rock mountain", 1, "dense")[0].title == "Volcano"
    with pytest.raises(UserError, match="^knowledge base sparse has dense embeddings: add to it with them"):
        KnowledgeBase.build("sparse", [write_corpus(tmp_path, ["Glacier"])], dense=False)


def test_nothing_reaches_the_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("retrieval tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    retrieval.load_embedder.cache_clear()  # load wordllama again, under the block
    kb = KnowledgeBase.build("offline", [write_corpus(tmp_path)])
    assert kb.search(QUERIES["Glacier"], 1, "hybrid")[0].title == "Glacier"


# -----------------------------------------------------------------------------
# Documents, chunks and passages

def test_chunks_overlap_and_keep_their_ids():
    doc = {"id": "d", "title": "T", "text": " ".join(f"w{i}" for i in range(25)), "source": "s.txt"}
    chunks = chunk_document(doc, words=10, overlap=3)
    assert [c.text.split() for c in chunks] == [[f"w{i}" for i in range(a, b)] for a, b in ((0, 10), (7, 17), (14, 24), (21, 25))]
    assert [c.id for c in chunks] == ["d#0", "d#1", "d#2", "d#3"]
    assert {(c.title, c.source) for c in chunks} == {("T", "s.txt")}
    assert len(chunk_document({**doc, "text": " ".join(f"w{i}" for i in range(24))}, 10, 3)) == 3  # no chunk of overlap alone
    assert [c.text for c in chunk_document({**doc, "text": "a b c"}, 10, 3)] == ["a b c"]
    assert [c.text for c in chunk_document({**doc, "text": "a b c d"}, 2, 0)] == ["a b", "c d"]
    with pytest.raises(UserError, match="^chunks of 10 words cannot overlap by 10: "):
        chunk_document(doc, 10, 10)


def test_format_passages_is_compact():
    passages = [Passage("a#0", "Alpha", "first text", "a.txt"), Passage("b#0", "", "untitled text", "b.txt")]
    assert format_passages(passages) == "[1] Alpha: first text\n[2] untitled text"
    assert format_passages([]) == "no passages found"


def test_every_input_format_reads(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b_notes.txt").write_text("Plain   text\nacross lines.")
    (folder / "README.md").write_text("not data: a folder's other files are left out")
    (folder / "empty.txt").write_text("  \n")
    write_jsonl(folder / "sub" / "a.jsonl", [{"id": 7, "title": "Seven", "content": "from content"},
                                             {"title": "P", "paragraph_text": "from paragraph_text"}])
    (folder / "c.json").write_text(json.dumps([{"id": "j", "text": "from a json array"}]))
    pq.write_table(pa.table({"id": ["p1"], "title": ["Parquet"], "text": ["from parquet"]}), folder / "d.parquet")
    musique = {"id": "q1", "question": "?", "paragraphs": [{"idx": 0, "title": "M0", "paragraph_text": "musique zero"},
                                                           {"idx": 1, "title": "M1", "paragraph_text": "musique one"}]}
    hotpot = {"_id": "h1", "question": "?", "context": [["H0", ["Sentence one. ", " Sentence two."]]]}
    hotpot_hub = {"id": "h2", "question": "?", "context": {"title": ["H1"], "sentences": [["Hub layout."]]}}
    questions = write_jsonl(tmp_path / "questions.jsonl", [musique, hotpot, hotpot_hub, musique])

    docs = list(read_documents([folder, questions]))
    assert [(d["title"], d["text"]) for d in docs] == [
        ("b_notes", "Plain text across lines."), ("", "from a json array"), ("Parquet", "from parquet"),
        ("Seven", "from content"), ("P", "from paragraph_text"),
        ("M0", "musique zero"), ("M1", "musique one"), ("H0", "Sentence one. Sentence two."), ("H1", "Hub layout."),
        ("M0", "musique zero"), ("M1", "musique one")]
    assert [d["id"] for d in docs[1:4]] == ["j", "p1", "7"]
    assert docs[5]["id"] == docs[9]["id"] != docs[6]["id"]  # from a hash of title and text: stable, so repeats match
    assert docs[0]["source"] == str(folder / "b_notes.txt") and docs[3]["source"] == f"{folder / 'sub' / 'a.jsonl'}:1"

    kb = KnowledgeBase.build("formats", [folder, questions], dense=False)
    assert len(kb) == 9 and kb.meta["builds"][-1]["documents_skipped"] == 2  # the repeated MuSiQue row
    assert kb.search("hub layout", 1)[0].title == "H1"


@pytest.mark.parametrize("make, message", [
    (lambda p: [], "no input: name .txt, .jsonl, .json or .parquet files, or folders of them"),
    (lambda p: [p / "missing.txt"], "{p}/missing.txt does not exist: check the path"),
    (lambda p: [write_text(p / "x.csv", "a,b")], "{p}/x.csv is not a .txt, .jsonl, .json or .parquet file: convert it to one of those"),
    (lambda p: [write_text(p / "README.md", "").parent], "{p} holds no .txt, .jsonl, .json or .parquet files: point at the data itself"),
    (lambda p: [write_jsonl(p / "e.jsonl", [{"text": " "}])], "no text found in {p}/e.jsonl: give files with non-empty documents"),
    (lambda p: [write_jsonl(p / "n.jsonl", [{"body": "x"}])], "{p}/n.jsonl:1 has no text, content or paragraph_text field"),
    (lambda p: [write_jsonl(p / "l.jsonl", [[1, 2]])], "{p}/l.jsonl:1 is a JSON list, not an object: one document per row"),
    (lambda p: [write_text(p / "bad.parquet", "PAR1 no")], "{p}/bad.parquet is not a readable parquet file ("),
    (lambda p: [write_text(p / "bad.jsonl", '{"text": "ok"}\nnot json\n')], "{p}/bad.jsonl:2 is not valid JSON (Expecting value): one object per line"),
])
def test_bad_input_is_one_line(tmp_path, make, message):
    paths = make(tmp_path)
    with pytest.raises(UserError) as e:
        KnowledgeBase.build("bad", paths)
    assert str(e.value).startswith(message.format(p=tmp_path)) and "\n" not in str(e.value)
    assert not (tmp_path / "nanochat_base" / "rag" / "bad").exists()  # nothing written before the input checked out


def test_missing_base_and_bad_arguments_are_one_line(kb, base_dir):
    with pytest.raises(UserError, match=f"^no knowledge base nope at {base_dir}/rag/nope: build it with "
                                        r"python -m scripts.rag_index --kb nope PATH\.\.\.$"):
        KnowledgeBase.load("nope")
    with pytest.raises(UserError, match="^knowledge base name='../up' must be a plain folder name"):
        KnowledgeBase.load("../up")
    with pytest.raises(UserError, match="^retriever 'tfidf' is not one of bm25, dense, hybrid$"):
        kb.search("lava", 3, "tfidf")
    with pytest.raises(UserError, match="^a search returns at least 1 passage, not 0$"):
        kb.search("lava", 0)
    with pytest.raises(UserError, match="^no \\(question, title\\) pairs to measure recall on"):
        recall_at_k(kb, [], 1)


# -----------------------------------------------------------------------------
# scripts/rag_index.py, in-process

def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_rag_index_builds_adds_and_reports(tmp_path, base_dir, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for title in ("Volcano", "Bread", "Chess"):
        (folder / f"{title}.txt").write_text(CORPUS[title])
    rag_index.main(["--kb", "cli", str(folder), "--chunk_words", "12", "--overlap-words", "4"])
    result = last_json(capsys)
    assert result["stage"] == "rag_index" and result["path"] == str(base_dir / "rag" / "cli")
    assert result["documents"] == result["documents_added"] == 3 and result["chunks"] == result["chunks_added"] > 3
    assert result["retrievers"] == ["bm25", "dense", "hybrid"] and result["recall"] is None

    chunks = result["chunks"]
    rag_index.main(["--kb", "cli", str(folder), str(write_corpus(tmp_path, ["Glacier"]))])  # the base's chunk sizes
    result = last_json(capsys)
    assert (result["documents"], result["documents_added"], result["documents_skipped"]) == (4, 1, 3)
    assert result["chunks"] == chunks + result["chunks_added"]
    assert KnowledgeBase.load("cli").search(QUERIES["Glacier"], 1, "hybrid")[0].title == "Glacier"

    rag_index.main(["--kb", "sparse", str(folder), "--no-dense"])
    assert last_json(capsys)["retrievers"] == ["bm25"]


@pytest.mark.parametrize("argv, message", [
    (["--kb", "x"], "nothing to do: name files or folders to add, or --questions to measure recall on"),
    (["--kb", "x", "f", "--chunk-words", "0"], "--chunk-words=0 must be at least 1"),
    (["--kb", "x", "f", "--overlap-words", "-1"], "--overlap-words=-1 must be at least 0"),
    (["--kb", "x", "f", "--chunk-words", "5", "--overlap-words", "5"], "--overlap-words=5 must be less than --chunk-words=5"),
    (["--kb", "x", "f", "-k", "0"], "-k/--recall-at=0 must be at least 1"),
    (["--kb", "a/b", "f"], "--kb='a/b' must be a plain folder name"),
    (["--kb", "x", "--questions", "q.jsonl"], "no questions at q.jsonl: "),
    (["--kb", "nope", "--questions", "{questions}"], "no knowledge base nope at "),
])
def test_rag_index_flags_are_one_line(tmp_path, argv, message):
    questions = write_questions(tmp_path)
    with pytest.raises(UserError) as e:
        rag_index.main([a.format(questions=questions) for a in argv])
    assert str(e.value).startswith(message)


def write_questions(tmp_path):
    """One single-hop MuSiQue-layout question per corpus passage."""
    rows = [{"id": f"q{i}", "question": query, "answer": title, "answer_aliases": [], "answerable": True,
             "question_decomposition": [{"id": 0, "question": query, "answer": title, "paragraph_support_idx": 0}],
             "paragraphs": [{"idx": 0, "title": title, "paragraph_text": CORPUS[title], "is_supporting": True}]}
            for i, (title, query) in enumerate(QUERIES.items())]
    return write_jsonl(tmp_path / "questions.jsonl", rows)


def test_rag_index_measures_recall(tmp_path, capsys):
    questions = write_questions(tmp_path)
    rag_index.main(["--kb", "qa", str(write_corpus(tmp_path)), "--questions", str(questions), "-k", "1", "3"])
    result = last_json(capsys)
    assert result["pairs"] == len(QUERIES) and result["chunks_added"] == len(CORPUS)
    assert result["recall"] == {r: {"1": 1.0, "3": 1.0} for r in ("bm25", "dense", "hybrid")}
    rag_index.main(["--kb", "qa", "--questions", str(questions), "-k", "1"])  # the base as it is: nothing added
    result = last_json(capsys)
    assert result["chunks_added"] == 0 and result["recall"] == {r: {"1": 1.0} for r in ("bm25", "dense", "hybrid")}


def test_chat_scripts_open_the_base_their_flags_name(tmp_path):
    parser = Flags()
    retrieval.add_kb_flags(parser, questions=True)
    assert retrieval.open_kb(parser.parse_args([])) is None
    KnowledgeBase.build("sparse", [write_corpus(tmp_path)], dense=False)
    args = parser.parse_args(["--kb", "sparse", "--passages", "2", "--rag-data", "synthetic"])
    assert retrieval.open_kb(args).search(QUERIES["Bread"], args.passages)[0].title == "Bread"
    with pytest.raises(UserError, match="^--retriever=hybrid needs dense embeddings, which knowledge base sparse"):
        retrieval.open_kb(parser.parse_args(["--kb", "sparse", "--retriever", "hybrid"]))
    with pytest.raises(UserError, match="^--passages=0 must be at least 1$"):
        retrieval.open_kb(parser.parse_args(["--passages", "0"]))
    for flags in (["--passages", "2"], ["--retriever", "dense"]):  # they would do nothing without a base
        with pytest.raises(UserError, match="^--retriever and --passages choose how --kb is searched: give --kb NAME"):
            retrieval.open_kb(parser.parse_args(flags))
