"""
RAG question sets (issue 12): dev/gen_rag_data.py's offline multi-hop set and tasks/rag.py's conversations and
scoring. Hermetic: each test generates a small set under its own NANOCHAT_BASE_DIR and indexes it with BM25.
"""

import json
import re

import pytest

from dev import gen_rag_data
from nanochat.common import UserError
from nanochat.engine import SEARCH
from nanochat.retrieval import KnowledgeBase, format_passages
from tasks.rag import RAGQA, f1, hop_queries, load_questions, retrieval_pairs

SMALL = ["--entities", "90", "--train", "150", "--test", "30"]
HOTPOT = {"_id": "5a8b", "question": "Which band was formed first, Ash Lanes or Cold Rivers?", "answer": "Cold Rivers",
          "type": "comparison", "level": "easy", "supporting_facts": [["Cold Rivers", 0], ["Ash Lanes", 1], ["Cold Rivers", 1]],
          "context": [["Ash Lanes", ["Ash Lanes is a band.", " It formed in 1999."]], ["Pine Road", ["Pine Road is a street."]],
                      ["Cold Rivers", ["Cold Rivers is a band.", " It formed in 1987."]]]}


def generate(*flags):
    gen_rag_data.main([*SMALL, *flags])


def rows(base_dir, split):
    return load_questions(str(base_dir / "task_data" / "rag" / "synthetic" / f"{split}.jsonl"))


def build_kb(base_dir):
    return KnowledgeBase.build("synthetic", [str(base_dir / "task_data" / "rag" / "synthetic" / "corpus.jsonl")], dense=False)


def test_generator_is_deterministic_and_writes_musique_layout(tmp_path, capsys):
    files = ("corpus.jsonl", "train.jsonl", "test.jsonl")
    for out in ("a", "b"):
        generate("--out", str(tmp_path / out))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stage"] == "gen_rag_data" and result["train_questions"] == 150 and result["test_questions"] == 30
    assert result["hops"] == {"train": {"1": 50, "2": 50, "3": 50}, "test": {"1": 10, "2": 10, "3": 10}}
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    generate("--out", str(tmp_path / "c"), "--seed", "1")
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()

    splits = {split: load_questions(str(tmp_path / "a" / f"{split}.jsonl")) for split in ("train", "test")}
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["test"]}
    for row in splits["train"] + splits["test"]:
        assert set(row) == {"id", "question", "question_decomposition", "paragraphs", "answer", "answer_aliases", "answerable"}
        assert row["answerable"] is True and row["answer"] == row["question_decomposition"][-1]["answer"]
        assert [p["idx"] for p in row["paragraphs"]] == list(range(len(row["paragraphs"])))
        assert all(set(p) == {"idx", "title", "paragraph_text", "is_supporting"} for p in row["paragraphs"])
        hops = row["question_decomposition"]
        assert all(set(h) == {"id", "question", "answer", "paragraph_support_idx"} for h in hops)
        assert sum(p["is_supporting"] for p in row["paragraphs"]) == len(hops) < len(row["paragraphs"])  # distractors too
        for i, hop in enumerate(hops[1:], 1):  # a later hop names the one before by placeholder, as MuSiQue does
            assert f"#{i}" in hop["question"] and hops[i - 1]["answer"] not in hop["question"]
    corpus = [json.loads(line) for line in open(tmp_path / "a" / "corpus.jsonl")]
    assert all(set(doc) == {"id", "title", "text"} for doc in corpus)
    assert len({doc["title"] for doc in corpus}) == len(corpus)  # one paragraph per name


def test_supporting_paragraphs_hold_every_hop_answer(base_dir):
    generate()
    corpus = {doc["title"]: doc["text"] for doc in map(json.loads, open(base_dir / "task_data/rag/synthetic/corpus.jsonl"))}
    for row in rows(base_dir, "train") + rows(base_dir, "test"):
        paragraphs = {p["idx"]: p for p in row["paragraphs"]}
        for i, hop in enumerate(row["question_decomposition"]):
            support = paragraphs[hop["paragraph_support_idx"]]
            assert support["is_supporting"] and hop["answer"] in support["paragraph_text"]
            assert corpus[support["title"]] == support["paragraph_text"]  # the question's paragraphs are the KB's
            subject = row["question_decomposition"][i - 1]["answer"] if i else support["title"]
            assert support["title"] == subject and subject in (row["question"] if i == 0 else support["paragraph_text"])


def test_distractors_share_words_with_the_supporting_paragraphs(base_dir):
    generate()
    test = rows(base_dir, "test")
    near = 0
    for row in test:
        titles = [p["title"] for p in row["paragraphs"] if p["is_supporting"]]
        near += any(t in p["paragraph_text"] for p in row["paragraphs"] if not p["is_supporting"] for t in titles)
    assert near > 0.9 * len(test)
    text = (base_dir / "task_data/rag/synthetic/corpus.jsonl").read_text()
    assert ", a cousin of " in text and ", a village near " in text  # namesakes of real entities


def test_too_few_entities_for_the_questions_is_one_line(tmp_path):
    with pytest.raises(UserError, match="raise --entities or lower --train/--test") as e:
        gen_rag_data.main(["--out", str(tmp_path), "--entities", "30", "--train", "5000"])
    assert "\n" not in str(e.value)


def test_hotpotqa_layout_loads_as_musique(tmp_path):
    (tmp_path / "hotpot.jsonl").write_text(json.dumps(HOTPOT) + "\n")
    (tmp_path / "hotpot.json").write_text(json.dumps([HOTPOT]))
    row = load_questions(str(tmp_path / "hotpot.jsonl"))[0]
    assert load_questions(str(tmp_path / "hotpot.json")) == [row]
    assert [p["title"] for p in row["paragraphs"] if p["is_supporting"]] == ["Ash Lanes", "Cold Rivers"]
    assert row["paragraphs"][0]["paragraph_text"] == "Ash Lanes is a band. It formed in 1999."
    assert [row["paragraphs"][h["paragraph_support_idx"]]["title"] for h in row["question_decomposition"]] == ["Cold Rivers", "Ash Lanes"]
    assert row["answer"] == "Cold Rivers" and row["question_decomposition"][-1]["answer"] == "Cold Rivers"
    assert retrieval_pairs([row]) == [(HOTPOT["question"], "Cold Rivers"), (HOTPOT["question"], "Ash Lanes")]
    (tmp_path / "bad.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1 is neither MuSiQue"):
        load_questions(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(HOTPOT) + "\n{oops\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2 is not valid JSON"):
        load_questions(str(tmp_path / "bad.jsonl"))


def test_search_conversation_renders_tool_output_unsupervised(base_dir, tokenizer):
    generate()
    kb = build_kb(base_dir)
    task = RAGQA(split="test", mode="search", kb=kb, hops=3)
    row, conversation = task.rows[0], task[0]
    assert conversation == RAGQA(split="test", mode="search", kb=kb, hops=3)[0]  # deterministic
    parts = conversation["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["python", "python_output"] * 3 + ["text"]
    queries = [p["text"][len(SEARCH):].strip() for p in parts[0:6:2]]
    assert all(p["text"].startswith(SEARCH) for p in parts[0:6:2])  # what the Engine runs as a search
    assert queries == hop_queries(row) and not any("#" in q for q in queries)  # placeholders filled
    hops = row["question_decomposition"]
    assert hops[0]["answer"] in queries[1] and hops[1]["answer"] in queries[2]
    assert [p["text"] for p in parts[1:6:2]] == [format_passages(kb.search(q, 3, "bm25")) for q in queries]
    assert parts[-1]["text"] == row["answer"] and conversation["hops"] == 3

    ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**6)  # the test tokenizer's 400 tokens split finely
    assert ids[-1] == tokenizer.encode_special("<|assistant_end|>")
    special = {tokenizer.encode_special(s): s for s in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                                        "<|output_end|>", "<|assistant_start|>", "<|assistant_end|>")}
    region, seen = None, {"call": [], "output": [], "answer": []}
    for token, m in zip(ids, mask):
        name = special.get(token)
        if name in ("<|python_start|>", "<|python_end|>", "<|assistant_end|>"):
            assert m == 1, name
        if name in ("<|output_start|>", "<|output_end|>", "<|assistant_start|>"):
            assert m == 0, name
        region = {"<|python_start|>": "call", "<|output_start|>": "output", "<|output_end|>": "answer",
                  "<|python_end|>": None, "<|assistant_end|>": None}.get(name, region)
        if name is None and region:
            seen[region].append((token, m))
    assert all(m == 1 for _, m in seen["call"]) and all(m == 0 for _, m in seen["output"])
    assert all(m == 1 for _, m in seen["answer"]) and tokenizer.decode([t for t, _ in seen["answer"]]) == row["answer"]
    assert tokenizer.decode([t for t, _ in seen["call"]]) == "".join(p["text"] for p in parts[0:6:2])


def test_context_and_closed_modes_and_their_errors(base_dir):
    generate()
    kb = build_kb(base_dir)
    row = rows(base_dir, "test")[0]
    context = RAGQA(split="test", mode="context", kb=kb, top_k=2)[0]
    user, reply = context["messages"][0]["content"], context["messages"][1]["content"]
    assert user == f"{format_passages(kb.search(row['question'], 2))}\n\n{row['question']}" and reply == row["answer"]
    closed = RAGQA(split="test", mode="closed")[0]  # needs no knowledge base
    assert closed["messages"] == [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    assert closed["answers"] == [row["answer"], *row["answer_aliases"]]
    for mode in ("search", "context"):
        with pytest.raises(UserError, match=f"RAG mode {mode} searches a knowledge base and none was given"):
            RAGQA(split="test", mode=mode)
    with pytest.raises(UserError, match="is not one of search, context, closed"):
        RAGQA(split="test", mode="open-book", kb=kb)


def test_hops_filter_splits_single_and_multi_hop(base_dir):
    generate()
    assert [RAGQA(split="test", mode="closed", hops=1)[i]["hops"] for i in range(10)] == [1] * 10
    multi = RAGQA(split="test", mode="closed", hops=(2, 3))
    assert len(multi) == 20 and {multi[i]["hops"] for i in range(len(multi))} == {2, 3}
    with pytest.raises(UserError, match="no 4-hop questions in"):
        RAGQA(split="test", mode="closed", hops=4)


def test_evaluate_and_reward_are_one_exactly_when_the_answer_matches(base_dir):
    generate()
    task = RAGQA(split="test", mode="closed")
    conversation = {"answers": ["Velmoria", "Republic of Velmoria"]}
    tool = "<|python_start|>search: Where is Kesh?<|python_end|><|output_start|>[1] Kesh: Kesh lies in Velmoria.<|output_end|>"
    for right in ("Velmoria", " velmoria. ", "The Republic of Velmoria!", tool + "Velmoria<|assistant_end|>",
                  tool + tool + " the   VELMORIA"):
        assert task.evaluate(conversation, right) == 1 and task.reward(conversation, right) == 1.0, right
    for wrong in ("", "Velmoria River", "It is Velmoria.", "Republic", tool, tool + "Kesh", "<|python_start|>search: Velmoria"):
        assert task.evaluate(conversation, wrong) == 0 and task.reward(conversation, wrong) == 0.0, wrong
    for i in range(len(task)):  # every gold answer and alias scores 1, after a search or not
        example = task[i]
        assert all(task.evaluate(example, tool + a) == 1 for a in example["answers"])


def test_f1_on_hand_cases():
    assert f1("the Thalor River", ["Thalor River"]) == 1.0
    assert f1("Thalor", ["Thalor River"]) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert f1("Thalor River delta", ["Thalor River"]) == pytest.approx(0.8)  # precision 2/3, recall 1
    assert f1("Kesh", ["Thalor River", "Kesh"]) == 1.0  # the best alias counts
    assert f1("Velmora", ["Thalor River"]) == 0.0 and f1("", ["Thalor River"]) == 0.0 and f1("the", ["a"]) == 1.0


def test_missing_question_file_is_one_line():
    with pytest.raises(UserError) as e:
        RAGQA(split="test", mode="closed")
    message = str(e.value)
    assert "\n" not in message and re.search(r"no questions at .*task_data/rag/synthetic/test\.jsonl", message)
    assert "python -m dev.gen_rag_data" in message
