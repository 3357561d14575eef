"""
Evaluate a chat model: ARC-Easy, ARC-Challenge and MMLU (categorical: the answer letter's logit), GSM8K,
HumanEval and SpellingBee (generative: pass@n by sampling), and ChatCORE, their mean accuracy above chance,
when all six ran. SyntheticMath (offline GSM8K-style problems) is available too, outside ChatCORE.

    python -m scripts.chat_eval -i sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft -a "GSM8K|HumanEval"
    python -m scripts.chat_eval -i sft -a "HumanEval|SpellingBee|SyntheticMath" -x 50     # offline
    python -m scripts.chat_eval -i rl -a "RAG-closed|RAG-context|RAG-search" --kb synthetic   # with and without retrieval

The RAG tasks answer the --rag-data test questions (python -m dev.gen_rag_data writes the offline set) closed-book,
from the passages --kb finds for the question placed before it, or by searching --kb (a model taught to by RAG SFT);
each is scored by exact match on single-hop and multi-hop questions apart, then on all.
"""

from nanochat.common import (Flags, UserError, check_minimums, compute_cleanup, compute_init, get_compute_dtype, print0,
                             print_result, run_cli)
from nanochat.retrieval import add_kb_flags, open_kb
from tasks.common import CHAT_TASKS
from tasks.rag import settings


def main(argv=None):
    p = Flags(description="Evaluate a chat model.")
    p.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
    p.add_argument("-a", "--task-name", default="|".join(CHAT_TASKS[:6]), help=f"|-separated, from {', '.join(CHAT_TASKS)}")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass for categorical tasks")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    add_kb_flags(p, questions=True)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.task_name.split("|") if n.strip()]
    unknown = [n for n in names if n not in CHAT_TASKS]
    if unknown or not names:
        raise UserError(f"unknown task {', '.join(unknown) or '(none)'}: choose from {', '.join(CHAT_TASKS)}")
    check_minimums(args, {"-m/--max-new-tokens": 1, "-n/--num-samples": 1, "-k/--top-k": 0, "-b/--batch-size": 1,
                          "-x/--max-problems": 1, "-t/--temperature": 0})
    if args.num_samples > 1 and args.temperature == 0:
        raise UserError("-n above 1 samples the same greedy answer every time: give a temperature (-t 1.0)")

    kb = open_kb(args)
    rag = settings(args, kb)
    from nanochat.checkpoint_manager import load_model
    from tasks.common import BASELINES, chat_task, chatcore, evaluate_chat_tasks
    for name in names:  # a RAG task's question file and knowledge base are checked before the model loads
        if name.startswith("RAG-"):
            chat_task(name, rag)

    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, get_compute_dtype(device.type)[0], model_tag=args.model_tag,
                                        step=args.step)
    accuracies = {}
    for name, hits, n in evaluate_chat_tasks(names, model, tokenizer, args.max_problems, args.max_problems, args.batch_size,
                                             args.num_samples, args.max_new_tokens, args.temperature, args.top_k, rag):
        if n == 0:  # an accuracy of 0/0 is no result, not 0
            raise UserError(f"{name} has no problems to evaluate: check its data")
        accuracies[name] = hits / n
        print0(f"{name}: {accuracies[name]:.4f} ({hits}/{n})")
    score = chatcore({k: v for k, v in accuracies.items() if k in BASELINES})
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")
    print_result("chat_eval", source=args.source, step=meta["step"], kb=args.kb, results=accuracies, chatcore=score)
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
