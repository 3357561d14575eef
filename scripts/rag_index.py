"""
Build a knowledge base for retrieval-augmented chat, or add documents to one, and measure its retrievers' recall@k.

    python -m scripts.rag_index --kb wiki notes/ papers.jsonl           # .txt, .jsonl, .json, .parquet, or folders
    python -m scripts.rag_index --kb synthetic corpus.jsonl --questions test.jsonl   # and recall@1/3/5 per retriever
    python -m scripts.rag_index --kb synthetic --questions test.jsonl   # recall of the base as it is
"""

import time

from nanochat.common import Flags, UserError, check_folder_name, check_minimums, print_result, run_cli
from nanochat.retrieval import KnowledgeBase, recall_at_k
from tasks.rag import load_questions, retrieval_pairs


def measure_recall(kb, pairs, ks, source):
    """{retriever: {k: recall@k}} for every retriever the base supports, over (sub-question, gold title) pairs."""
    recall = {r: {k: round(recall_at_k(kb, pairs, k, r), 4) for k in ks} for r in kb.retrievers}
    print(f"recall@k over {len(pairs)} (question, supporting title) pairs from {source}:")
    print(f"{'retriever':<10}" + "".join(f" {'@' + str(k):>6}" for k in ks))
    for r, row in recall.items():
        print(f"{r:<10}" + "".join(f" {row[k]:>6.3f}" for k in ks))
    return recall


def main(argv=None):
    parser = Flags(description="Build or add to a knowledge base; measure its retrievers' recall@k.")
    parser.add_argument("paths", nargs="*", help=".txt, .jsonl, .json or .parquet files, or folders of them, to add")
    parser.add_argument("--kb", required=True, help="the base's name: it lives in $NANOCHAT_BASE_DIR/rag/NAME/")
    parser.add_argument("--chunk-words", type=int, default=None, help="words per chunk (default: the base's, or 100)")
    parser.add_argument("--overlap-words", type=int, default=None, help="words shared by neighbouring chunks (default: "
                        "the base's, or 20)")
    parser.add_argument("--no-dense", action="store_true", help="skip the wordllama embeddings (BM25 only)")
    parser.add_argument("--questions", default=None, help="MuSiQue- or HotpotQA-layout .jsonl to measure recall@k on")
    parser.add_argument("-k", "--recall-at", type=int, nargs="+", default=[1, 3, 5], help="the k of recall@k")
    args = parser.parse_args(argv)
    check_folder_name("--kb", args.kb)
    check_minimums(args, {"--chunk-words": 1, "--overlap-words": 0})
    if args.chunk_words is not None and args.overlap_words is not None and args.overlap_words >= args.chunk_words:
        raise UserError(f"--overlap-words={args.overlap_words} must be less than --chunk-words={args.chunk_words}")
    if min(args.recall_at) < 1:
        raise UserError(f"-k/--recall-at={min(args.recall_at)} must be at least 1")
    if not args.paths and args.questions is None:
        raise UserError("nothing to do: name files or folders to add, or --questions to measure recall on")
    pairs = retrieval_pairs(load_questions(args.questions)) if args.questions else None
    if pairs == []:
        raise UserError(f"--questions={args.questions} has no hop with a supporting paragraph to measure recall on")

    t0 = time.time()
    if args.paths:
        kb = KnowledgeBase.build(args.kb, args.paths, args.chunk_words, args.overlap_words, dense=False if args.no_dense else None)
        added = kb.meta["builds"][-1]
        print(f"added {added['documents_added']:,} documents as {added['chunks_added']:,} chunks "
              f"({added['documents_skipped']:,} skipped: already in the base or repeated) in {time.time() - t0:.2f}s")
    else:
        kb, added = KnowledgeBase.load(args.kb), {"documents_added": 0, "documents_skipped": 0, "chunks_added": 0}
    print(f"knowledge base {kb.name} at {kb.path}: {kb.meta['documents']:,} documents, {len(kb):,} chunks of "
          f"{kb.meta['chunk_words']} words ({kb.meta['overlap_words']} overlapping); retrievers: {', '.join(kb.retrievers)}")
    recall = measure_recall(kb, pairs, args.recall_at, args.questions) if pairs else None
    print_result("rag_index", kb=kb.name, path=kb.path, documents=kb.meta["documents"], chunks=len(kb),
                 documents_added=added["documents_added"], documents_skipped=added["documents_skipped"],
                 chunks_added=added["chunks_added"], retrievers=kb.retrievers, questions=args.questions,
                 pairs=len(pairs) if pairs else None, recall=recall, seconds=round(time.time() - t0, 2))


if __name__ == "__main__":
    run_cli(main)
