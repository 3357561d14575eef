"""
Questions answered from a knowledge base (issue 12), read from MuSiQue-layout files (HotpotQA's is converted) under
$NANOCHAT_BASE_DIR/task_data/rag/DATASET/SPLIT.jsonl; python -m dev.gen_rag_data writes the offline synthetic set.
Three modes, one conversation per question:
- search: the assistant searches each hop's sub-question (earlier answers filled into #1, #2) as a tool call,
  reads the passages the knowledge base returns as the tool's output (never trained on), then gives the answer;
- context: single-shot RAG, the question's passages placed before it in the user turn;
- closed: the question alone (what the model knows without retrieval).
Answers are scored by exact match after SQuAD's normalisation (evaluate, reward) or by token F1 (f1).
"""

import collections
import json
import os
import re
import string

from nanochat.common import UserError, get_base_dir
from tasks.common import Task

MODES = ("search", "context", "closed")
SEARCH = "search: "  # the tool call the Engine runs against its knowledge base (nanochat.engine.SEARCH)


def load_questions(path):
    """
    The rows of a .jsonl (or .json array) file as MuSiQue-layout dicts: {id, question, question_decomposition: [{id,
    question, answer, paragraph_support_idx}], paragraphs: [{idx, title, paragraph_text, is_supporting}], answer,
    answer_aliases, answerable}. HotpotQA rows are converted, their supporting titles becoming the hops.
    """
    if not os.path.exists(path):
        raise UserError(f"no questions at {path}: write the synthetic set with python -m dev.gen_rag_data, or put "
                        "MuSiQue- or HotpotQA-layout .jsonl files there")
    out = []
    for where, row in read_rows(path):
        if isinstance(row, dict) and "question_decomposition" in row and "paragraphs" in row:
            out.append(row)
        elif isinstance(row, dict) and "supporting_facts" in row and "context" in row:
            out.append(from_hotpotqa(row))
        else:
            raise UserError(f"{where} is neither MuSiQue (question_decomposition, paragraphs) nor HotpotQA "
                            "(supporting_facts, context) layout: fix or remove it")
    return out


def read_rows(path):
    """(where, row) for each row of a .jsonl file or a .json array, where naming the file and line or row."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix or remove it") from None
            return [(f"{path}:{i}", row) for i, row in enumerate(rows if isinstance(rows, list) else [rows], 1)]
        rows = []
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i} is not valid JSON ({e.msg}): one object per line") from None
        return rows


def from_hotpotqa(row):
    """
    A HotpotQA row in MuSiQue's layout. HotpotQA has no sub-questions: each supporting paragraph is a hop whose
    question is the whole question (its usual supporting-paragraph recall); only the last hop's answer is known.
    """
    context, facts = row["context"], row["supporting_facts"]
    if isinstance(context, dict):  # the hub's parquet layout: {"title": [...], "sentences": [[...]]}
        context, facts = zip(context["title"], context["sentences"]), zip(facts["title"], facts["sent_id"])
    paragraphs = [{"idx": i, "title": title, "paragraph_text": " ".join(s.strip() for s in sentences)}
                  for i, (title, sentences) in enumerate(context)]
    gold = list(dict.fromkeys(title for title, _ in facts))  # in order of first mention
    idx = {p["title"]: p["idx"] for p in paragraphs}
    for p in paragraphs:
        p["is_supporting"] = p["title"] in gold
    qid = row.get("_id", row.get("id", ""))  # the hub's copy says id
    hops = [{"id": f"{qid}/{i}", "question": row["question"], "answer": row["answer"] if i == len(gold) - 1 else "",
             "paragraph_support_idx": idx.get(title)} for i, title in enumerate(gold)]
    return {"id": qid, "question": row["question"], "question_decomposition": hops, "paragraphs": paragraphs,
            "answer": row["answer"], "answer_aliases": [], "answerable": True}


def hop_queries(row):
    """Each hop's sub-question with #1, #2... replaced by the earlier hops' answers (a # that names no earlier hop
    with an answer, as in a HotpotQA question's own text, stays as written)."""
    answers = [hop["answer"] for hop in row["question_decomposition"]]

    def fill(i, question):
        earlier = lambda m: answers[int(m.group(1)) - 1] if 1 <= int(m.group(1)) <= i and answers[int(m.group(1)) - 1] \
            else m.group(0)
        return re.sub(r"#(\d+)", earlier, question)
    return [fill(i, hop["question"]) for i, hop in enumerate(row["question_decomposition"])]


def retrieval_pairs(rows):
    """(filled sub-question, title of its supporting paragraph) for every hop: what recall@k is measured on."""
    pairs = []
    for row in rows:
        titles = {p["idx"]: p["title"] for p in row["paragraphs"]}
        for query, hop in zip(hop_queries(row), row["question_decomposition"]):
            if hop["paragraph_support_idx"] in titles:
                pairs.append((query, titles[hop["paragraph_support_idx"]]))
    return pairs


# -----------------------------------------------------------------------------
# Scoring

def normalize_answer(text):
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def final_answer(completion):
    """The text after the last tool output, without special tokens: a completion may hold its decoded searches."""
    return re.sub(r"<\|[a-z_]+\|>", " ", completion.rpartition("<|output_end|>")[2])


def f1(prediction, answers):
    """The best token F1 (SQuAD's) of a prediction against any of the gold answers."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
        elif common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def settings(args, kb):
    """RAGQA's dataset, kb, top_k and retriever, from the flags retrieval.add_kb_flags(questions=True) adds."""
    return dict(dataset=args.rag_data, kb=kb, top_k=args.passages, retriever=args.retriever)


class RAGQA(Task):
    """
    dataset/split name a file under task_data/rag/. kb (a retrieval.KnowledgeBase) is searched live, top_k passages
    a search with `retriever`, in the search and context modes. hops keeps only questions of that many hops (an int
    or several), so an eval can report single-hop and multi-hop apart. Unanswerable MuSiQue rows are left out.
    """

    def __init__(self, dataset="synthetic", split="train", mode="search", kb=None, top_k=3, hops=None, retriever="bm25",
                 **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise UserError(f"RAG mode {mode!r} is not one of {', '.join(MODES)}")
        if mode != "closed" and kb is None:
            raise UserError(f"RAG mode {mode} searches a knowledge base and none was given: pass --kb NAME (build one "
                            "with python -m scripts.rag_index --kb NAME PATH...), or use mode closed")
        self.mode, self.kb, self.top_k, self.retriever = mode, kb, top_k, retriever
        path = os.path.join(get_base_dir(), "task_data", "rag", dataset, f"{split}.jsonl")
        if not os.path.exists(path) and os.path.exists(path[:-1]):  # HotpotQA ships a .json array
            path = path[:-1]
        rows = [r for r in load_questions(path) if r.get("answerable", True)]
        if hops is not None:
            wanted = {hops} if isinstance(hops, int) else set(hops)
            rows = [r for r in rows if len(r["question_decomposition"]) in wanted]
            if not rows:
                raise UserError(f"no {'/'.join(map(str, sorted(wanted)))}-hop questions in {path}: ask for other hops")
        self.rows = rows

    def num_examples(self):
        return len(self.rows)

    def search(self, query):
        return self.kb.search(query, self.top_k, self.retriever)

    def get_example(self, index):
        from nanochat.retrieval import format_passages, with_passages
        row = self.rows[index]
        question, answer = row["question"], row["answer"]
        if self.mode == "search":
            parts = []
            for query in dict.fromkeys(hop_queries(row)):  # a query asked twice (HotpotQA's) would find the same
                parts += [{"type": "python", "text": SEARCH + query},
                          {"type": "python_output", "text": format_passages(self.search(query))}]
            reply = parts + [{"type": "text", "text": answer}]
        else:
            reply = answer
            if self.mode == "context":
                question = with_passages(question, self.search(question))
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
                "answers": [answer, *row.get("answer_aliases", [])], "hops": len(row["question_decomposition"])}

    def evaluate(self, conversation, completion):
        predicted = normalize_answer(final_answer(completion))
        return int(any(predicted == normalize_answer(a) for a in conversation["answers"]))

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))
