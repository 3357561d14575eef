"""
The CORE metric (DCLM, arXiv 2406.11794): 22 in-context-learning tasks scored from a base model's likelihoods.
Each task's accuracy is centred against its random baseline, (acc - base) / (1 - base), and CORE is their mean.
GPT-2 (1.5B) scores 0.2565.

Three kinds of task:
- multiple_choice: one prompt per choice; the choice whose tokens get the lowest mean loss wins
- schema: one prompt per context option, sharing the continuation; the context under which the continuation
  gets the lowest mean loss wins
- language_modeling: correct only if greedy decoding reproduces the continuation exactly
"""

import csv
import fcntl
import json
import os
import random
import shutil
import zipfile
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import UserError, get_base_dir, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def get_eval_bundle():
    """The bundle folder (core.yaml, eval_data/, eval_meta_data.csv), downloaded and unpacked once, under a lock."""
    from nanochat.dataset import check_reachable, fetch
    base = get_base_dir()
    bundle = os.path.join(base, "eval_bundle")
    if os.path.exists(os.path.join(bundle, "core.yaml")):
        return bundle
    with open(os.path.join(base, "eval_bundle.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank or run may be fetching it right now
        if not os.path.exists(os.path.join(bundle, "core.yaml")):
            archive = os.path.join(base, "eval_bundle.zip")
            if not zipfile.is_zipfile(archive):
                check_reachable(EVAL_BUNDLE_URL, hint=f"or place eval_bundle.zip in {base} (CORE needs it once)")
                fetch(EVAL_BUNDLE_URL, archive, check=zipfile.is_zipfile)
            staging = bundle + ".tmp"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(staging)
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a damaged member
                shutil.rmtree(staging, ignore_errors=True)
                raise UserError(f"cannot unpack {archive} ({e}): delete it so it is fetched again") from None
            inner = os.path.join(staging, "eval_bundle")  # the archive holds one top-level folder
            unpacked = inner if os.path.isdir(inner) else staging
            if not os.path.exists(os.path.join(unpacked, "core.yaml")):
                shutil.rmtree(staging, ignore_errors=True)
                raise UserError(f"{archive} is not the CORE eval bundle (no core.yaml inside): delete it so it is "
                                "fetched again")
            shutil.rmtree(bundle, ignore_errors=True)  # a half-made bundle, without its core.yaml
            os.replace(unpacked, bundle)
            shutil.rmtree(staging, ignore_errors=True)
    return bundle


def load_tasks(bundle):
    """[(task config, random baseline in %)] from core.yaml and eval_meta_data.csv, each task's data file checked."""
    import yaml
    try:
        with open(os.path.join(bundle, "core.yaml")) as f:
            tasks = yaml.safe_load(f)["icl_tasks"]
        with open(os.path.join(bundle, "eval_meta_data.csv")) as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        for task in tasks:  # missing data fails here, before any task has run
            open(os.path.join(bundle, "eval_data", task["dataset_uri"])).close()
        return [(task, baselines[task["label"]]) for task in tasks]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"the eval bundle at {bundle} is damaged ({type(e).__name__}: {e}): delete it, and the "
                        "eval_bundle.zip beside it, so they are fetched again") from None


# -----------------------------------------------------------------------------
# Prompts and the tokens to score

def render_prompts(kind, item, fewshot, delim):
    """The prompts to score for one example, few-shot examples first, separated by blank lines."""
    if kind == "multiple_choice":
        shots = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delim}{item['continuation']}" for context in item["context_options"]]
    if kind == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delim}"
        # stripped, so the delimiter's space joins the continuation's first token as it does in the full prompt
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unknown CORE task type {kind!r}")


def scoring_spans(kind, token_lists):
    """Per sequence to score, the (start, end) of the tokens whose loss decides."""
    if kind == "multiple_choice":  # the choices differ after their common prefix
        prefix = 0
        while all(len(t) > prefix for t in token_lists) and len({t[prefix] for t in token_lists}) == 1:
            prefix += 1
        return [(prefix, len(t)) for t in token_lists]
    if kind == "schema":  # the contexts differ before their common suffix
        suffix = 0
        while all(len(t) > suffix for t in token_lists) and len({t[-1 - suffix] for t in token_lists}) == 1:
            suffix += 1
        return [(len(t) - suffix, len(t)) for t in token_lists]
    without, with_continuation = token_lists
    return [(len(without), len(with_continuation))]


@torch.no_grad()
def evaluate_example(model, tokenizer, kind, item, fewshot, delim, device):
    prompts = render_prompts(kind, item, fewshot, delim)
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    spans = scoring_spans(kind, tokens)
    if kind == "language_modeling":
        tokens = tokens[1:]  # score the full prompt only
    # as in the reference, prompts are cropped only where the rotary table ends (10x the training context), from
    # the left, and never into the span that is scored
    max_len = model.cos.size(1)
    rows = []
    for t, (start, end) in zip(tokens, spans):
        crop = max(0, len(t) - max_len)
        if start - crop < 1:
            raise ValueError(f"a CORE example of {len(t)} tokens does not fit the model's {max_len} positions "
                             "with its scored tokens whole")
        rows.append((t[crop:], start - crop, end - crop))
    width = max(len(t) for t, _, _ in rows)
    bos = tokenizer.get_bos_token_id()
    ids = torch.tensor([t + [bos] * (width - len(t)) for t, _, _ in rows], dtype=torch.long, device=device)
    logits = model(ids)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (n, width - 1)
    predictions = logits[:, :-1].argmax(dim=-1)
    if kind == "language_modeling":
        _, start, end = rows[0]
        return bool(torch.equal(predictions[0, start - 1:end - 1], ids[0, start:end]))
    mean_losses = [losses[i, start - 1:end - 1].mean().item() for i, (_, start, end) in enumerate(rows)]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model, tokenizer, task, data, device):
    """Accuracy on one task; examples are split across ranks and the results summed (a sharded model's every rank
    evaluates every example instead: each forward pass is a collective)."""
    from nanochat.parallel import is_sharded
    kind, delim = task["icl_task_type"], task.get("continuation_delimiter", " ")
    num_fewshot = task["num_fewshot"][0] if isinstance(task["num_fewshot"], list) else task["num_fewshot"]
    distributed = dist.is_available() and dist.is_initialized() and not is_sharded(model)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        others = [i for i in range(len(data)) if i != idx]
        shots = random.Random(1234 + idx).sample(others, min(num_fewshot, len(others)))
        correct[idx] = evaluate_example(model, tokenizer, kind, data[idx], [data[i] for i in shots], delim, device)
    if world > 1:
        dist.all_reduce(correct)
    return correct.mean().item()


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle=None):
    """{"results": accuracy per task, "centered_results": centred accuracy per task, "core_metric": their mean}."""
    bundle = bundle or get_eval_bundle()
    results, centered = {}, {}
    for task, baseline in load_tasks(bundle):
        with open(os.path.join(bundle, "eval_data", task["dataset_uri"])) as f:
            data = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        label = task["label"]
        results[label] = evaluate_task(model, tokenizer, task, data, device)
        centered[label] = (results[label] - 0.01 * baseline) / (1 - 0.01 * baseline)
        print0(f"{label:<40} accuracy {results[label]:.4f} | centered {centered[label]:+.4f} ({len(data)} examples)")
    core = sum(centered.values()) / len(centered)
    return {"results": results, "centered_results": centered, "core_metric": core}
