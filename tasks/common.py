"""
Tasks: datasets seen as conversations. A Task is a list-like view (start/stop/step slicing) of examples; each
example is a conversation {"messages": [...]}. Categorical tasks are scored from the logits of answer letters,
generative ones by sampling and checking the answer. Mixtures and sequences combine tasks for training.
"""

import os
import random
import socket

from nanochat.common import UserError, get_base_dir

HUB_HOST = "huggingface.co"


class Task:
    """A view over a subclass's examples: start, stop and step select which ones, like a slice."""

    eval_type = "generative"  # or "categorical"

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0 and step >= 1 and (stop is None or stop >= start)
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        """Whether a completion answers the conversation's question (1) or not (0)."""
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of a task with {len(self)}")
        return self.get_example(self.start + i * self.step)


class TaskMixture(Task):
    """Several tasks shuffled together, deterministically. List a task twice to see it twice (an epoch each)."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after another, in order: a curriculum."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks

    def num_examples(self):
        return sum(len(t) for t in self.tasks)

    def get_example(self, index):
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. The letter comes right after '=' with no space, so the prompt's letter token is the
    same token the model must answer with (' A' and 'A' are different tokens).
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


# -----------------------------------------------------------------------------
# Loading datasets from the Hugging Face hub (or local files)

def hub_reachable(timeout=3.0):
    """A quick check before the datasets library tries (offline it would retry for ~25 s). HF_HUB_OFFLINE=1 says no."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def task_data_path(path, name, split):
    """Where local files for a hub dataset may be put: $NANOCHAT_BASE_DIR/task_data/<org--repo>/<name>/<split>[.jsonl]."""
    return os.path.join(get_base_dir(), "task_data", path.replace("/", "--"), name or "default", split)


def load_hf_dataset(path, name=None, split="train", local=None, columns=()):
    """
    A datasets.Dataset from local files (.jsonl/.json/.parquet: a file or a folder of them) given as `local` or
    found at task_data_path(); otherwise from the hub, cached under $NANOCHAT_BASE_DIR/hf_datasets. Offline, the
    cache still works; a dataset never fetched fails at once with a line saying where local files can go. `columns`
    are the fields the task reads: data without one of them is refused here, in one line, not deep in a task.
    """
    if local is None:
        candidate = task_data_path(path, name, split)
        local = next((p for p in (candidate, candidate + ".jsonl", candidate + ".parquet") if os.path.exists(p)), None)
    offline = local is None and not hub_reachable()
    if offline:  # use the cache, and fail at once instead of retrying for ~25 s
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import huggingface_hub
    if offline:  # the libraries read those variables at import: tell them too, in case they were imported already
        datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures become one UserError line below
    datasets.disable_progress_bars()
    label = f"{path}{'/' + name if name else ''} ({split})"
    if local is not None:
        files = sorted(os.path.join(local, f) for f in os.listdir(local)) if os.path.isdir(local) else [local]
        files = [f for f in files if f.endswith((".jsonl", ".json", ".parquet"))]
        if not files:
            raise UserError(f"no .jsonl, .json or .parquet files at {local} for {path}")
        kind = "parquet" if files[0].endswith(".parquet") else "json"
        where = f"the {label} files at {local}"
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        except Exception as e:
            cause = e.__cause__ or e  # datasets wraps the parser's error, which says what is wrong
            reason = f"{type(cause).__name__}: {cause}".splitlines()[0].rstrip(": ")
            raise UserError(f"cannot read {where} ({reason}): fix or remove them") from None
    else:
        where = f"the {label} rows from the hub"
        try:
            ds = datasets.load_dataset(path, name, split=split, cache_dir=os.path.join(get_base_dir(), "hf_datasets"))
        except Exception as e:
            if offline:
                raise UserError(f"cannot load {label}: {HUB_HOST} is unreachable and it is not cached; connect once, or "
                                f"put the split's .jsonl/.parquet files in {task_data_path(path, name, split)}/") from None
            raise UserError(f"cannot load {label}: {type(e).__name__}: {e}") from None
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(f"{where} have no {missing[0]!r} field (each row needs {', '.join(columns)})"
                        + (": fix or remove them" if local is not None else ""))
    return ds


# -----------------------------------------------------------------------------
# Evaluation loops (chat_eval, and periodically during SFT)

def evaluate_generative(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        max_problems=None, rank=0, world_size=1):
    """
    pass@num_samples: a problem passes if any sample does. Returns (passed, total) on this rank. Answers stop at
    max_new_tokens or where the engine's positions end (engine.answer_budget), whichever comes first.
    """
    passed = total = 0
    n = len(task) if max_problems is None else min(len(task), max_problems)
    for i in range(rank, n, world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, temperature=temperature, top_k=top_k,
                                             max_tokens=engine.answer_budget(len(prompt), max_new_tokens), seed=i)
        completions = [tokenizer.decode(s[len(prompt):]) for s in sequences]
        passed += any(task.evaluate(conversation, c) for c in completions)
        total += 1
    return passed, total


def evaluate_categorical(task, tokenizer, model, batch_size=8, max_problems=None, rank=0, world_size=1):
    """Argmax over the answer letters' logits at the end of each prompt. Returns (correct, total) on this rank."""
    import torch
    bos = tokenizer.get_bos_token_id()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    indices = list(range(rank, n, world_size))
    correct = 0
    for b in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=model.get_device())
        with torch.no_grad():
            logits = model(ids)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            letter_ids = []
            for letter in letters:
                encoded = tokenizer.encode(letter)
                assert len(encoded) == 1, f"answer letter {letter!r} must be a single token"
                letter_ids.append(encoded[0])
            scores = logits[row, len(prompt) - 1, letter_ids]
            correct += task.evaluate(conversation, letters[int(scores.argmax())])
    return correct, len(indices)


# RAG-*: questions over a knowledge base (tasks/rag.py) answered by searching it, from passages placed before the
# question, or closed-book; each is scored on single-hop and multi-hop questions apart, then together
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "SyntheticMath",
              "RAG-search", "RAG-context", "RAG-closed"]
HOPS = {"1-hop": 1, "multi-hop": (2, 3, 4)}


def chat_task(name, rag=None, hops=None):
    """
    The test split of one of CHAT_TASKS, as chat_eval and ChatCORE during SFT both evaluate it. rag: RAGQA's
    dataset, kb, top_k and retriever for the RAG tasks, which keep only questions of `hops` hops (None: all).
    """
    if name.startswith("RAG-") and name in CHAT_TASKS:
        from tasks.rag import RAGQA
        return RAGQA(split="test", mode=name[len("RAG-"):], hops=hops, **(rag or {}))
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(name, "test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU("all", "test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K("main", "test")
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval()
    if name == "SpellingBee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(256, "test")
    if name == "SyntheticMath":
        from tasks.gsm8k import SyntheticMath
        return SyntheticMath(256, "test")
    raise UserError(f"unknown task {name!r}: choose from {', '.join(CHAT_TASKS)}")


def evaluate_chat_tasks(names, model, tokenizer, max_categorical=None, max_generative=None, batch_size=8, num_samples=1,
                        max_new_tokens=512, temperature=0.0, top_k=50, rag=None):
    """
    Yield (name, correct, total) per task, summed across ranks: the one evaluation behind chat_eval and ChatCORE
    during SFT. max_categorical / max_generative cap the problems of each kind (None: all). A RAG task yields
    "NAME 1-hop" and "NAME multi-hop" (each capped), then NAME, their sum; the Engine searches rag's kb.
    A sharded model (--parallel fsdp/tp) has every rank evaluate every problem: each forward pass is a collective.
    """
    import torch
    import torch.distributed as dist
    from nanochat.common import get_dist_info
    from nanochat.engine import Engine
    from nanochat.parallel import is_sharded
    split = not is_sharded(model)
    _, rank, _, world_size = get_dist_info() if split else (False, 0, 0, 1)
    rag = rag or {}
    engine = Engine(model, tokenizer, rag.get("kb"), rag.get("retriever", "bm25"), rag.get("top_k", 3))

    def evaluate(task):
        if task.eval_type == "categorical":
            hits, n = evaluate_categorical(task, tokenizer, model, batch_size, max_categorical, rank, world_size)
        else:
            hits, n = evaluate_generative(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                                          max_generative, rank, world_size)
        counts = torch.tensor([hits, n], dtype=torch.float64, device=model.get_device())
        if split and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    for name in names:
        if not name.startswith("RAG-"):
            yield name, *evaluate(chat_task(name))
            continue
        chat_task(name, rag)  # a missing question file or knowledge base is its own clear error
        hits = n = 0
        for label, hops in HOPS.items():
            try:
                task = chat_task(name, rag, hops)
            except UserError:  # no questions of these hops (HotpotQA has no single-hop ones)
                continue
            subset = evaluate(task)
            yield f"{name} {label}", *subset
            hits, n = hits + subset[0], n + subset[1]
        yield name, hits, n


BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}


def chatcore(accuracies):
    """The mean over tasks of accuracy centred on its random baseline; None unless every task has a result."""
    if set(accuracies) != set(BASELINES):
        return None
    return sum((accuracies[t] - b) / (1 - b) for t, b in BASELINES.items()) / len(BASELINES)
