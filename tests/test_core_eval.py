import json
import os
import zipfile

import pytest
import torch

from nanochat import core_eval
from nanochat.common import UserError

MC = [{"query": "Question: which is the river?", "choices": ["the stone", "the river", "the garden"], "gold": 1},
      {"query": "Question: which is winter?", "choices": ["winter", "summer"], "gold": 0},
      {"query": "Question: the letter?", "choices": ["a window", "a market", "a letter"], "gold": 2},
      {"query": "Question: bright or quiet?", "choices": ["quiet", "bright"], "gold": 1}]
SCHEMA = [{"context_options": ["The river was cold", "The garden was cold"], "continuation": "so we swam", "gold": 1},
          {"context_options": ["In winter", "In the morning"], "continuation": "the light was early", "gold": 1},
          {"context_options": ["The silver letter", "The stone letter"], "continuation": "shone", "gold": 1},
          {"context_options": ["Seven answers", "One answer"], "continuation": "were given", "gold": 1}]
LM = [{"context": "The capital of the garden is ", "continuation": "the river"},
      {"context": "Seven and seven make", "continuation": "fourteen"},
      {"context": "First comes winter, then", "continuation": "spring"},
      {"context": "A B C D", "continuation": "E F G"}]
TASKS = [("mc_task", "multiple_choice", MC, 25.0), ("schema_task", "schema", SCHEMA, 50.0), ("lm_task", "language_modeling", LM, 0.0)]


def write_bundle(root, num_fewshot=0):
    """A miniature eval bundle in the real layout: core.yaml, eval_data/*.jsonl, eval_meta_data.csv."""
    os.makedirs(os.path.join(root, "eval_data", "mini"), exist_ok=True)
    lines = ["icl_tasks:"]
    for label, kind, data, _ in TASKS:
        with open(os.path.join(root, "eval_data", "mini", f"{label}.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(item) for item in data) + "\n")
        lines += [f"- label: {label}", f"  dataset_uri: mini/{label}.jsonl", f"  num_fewshot: [{num_fewshot}]",
                  f"  icl_task_type: {kind}", "  continuation_delimiter: ' '"]
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Random baseline\n")
        f.writelines(f"{label},mini,{baseline}\n" for label, _, _, baseline in TASKS)
    return root


class Oracle(torch.nn.Module):
    """Knows the correct prompts of some examples by heart (next token for every prefix); uniform elsewhere."""

    def __init__(self, vocab_size, sequences, sequence_len=512, positions=5120):
        super().__init__()
        self.config = type("Config", (), {"sequence_len": sequence_len})()
        self.cos = torch.empty(1, positions)  # a GPT's rotary table: as many positions as the model can read
        self.vocab_size = vocab_size
        self.memory = {}
        for seq in sequences:
            for t in range(1, len(seq)):
                self.memory[tuple(seq[:t])] = seq[t]

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                if (nxt := self.memory.get(tuple(row[:t + 1]))) is not None:
                    logits[b, t, nxt] = 20.0
        return logits


def correct_prompt(kind, item):
    prompts = core_eval.render_prompts(kind, item, [], " ")
    return prompts[-1] if kind == "language_modeling" else prompts[item["gold"]]


def test_core_on_a_miniature_bundle_with_known_answers(tmp_path, tokenizer):
    bundle = write_bundle(str(tmp_path / "bundle"))
    known = {0, 1, 3}  # the oracle knows these examples of every task; the others it answers uniformly: wrong
    bos = tokenizer.get_bos_token_id()
    sequences = [tokenizer.encode(correct_prompt(kind, item), prepend=bos)
                 for _, kind, data, _ in TASKS for i, item in enumerate(data) if i in known]
    model = Oracle(tokenizer.get_vocab_size(), sequences)
    for _, kind, data, _ in TASKS:  # with uniform logits the first option wins ties: make that wrong
        assert all(item.get("gold", 1) != 0 for i, item in enumerate(data) if i not in known)
    out = core_eval.evaluate_core(model, tokenizer, "cpu", bundle=bundle)
    assert out["results"] == {"mc_task": 0.75, "schema_task": 0.75, "lm_task": 0.75}
    assert out["centered_results"]["mc_task"] == pytest.approx((0.75 - 0.25) / 0.75)
    assert out["centered_results"]["schema_task"] == pytest.approx(0.5)
    assert out["centered_results"]["lm_task"] == pytest.approx(0.75)
    assert out["core_metric"] == pytest.approx(((0.5 / 0.75) + 0.5 + 0.75) / 3)
    # max_per_task keeps the first examples of a fixed shuffle: 2 per task, so accuracies are halves
    truncated = core_eval.evaluate_core(model, tokenizer, "cpu", max_per_task=2, bundle=bundle)["results"]
    assert all(accuracy in (0.0, 0.5, 1.0) for accuracy in truncated.values())


def test_prompts_longer_than_the_training_context_are_scored_whole(tokenizer):
    """The reference never crops a nanochat model's CORE prompts (its rotary table covers 10x the context), and never
    crops into the scored span."""
    item = MC[1]
    prompt = tokenizer.encode(correct_prompt("multiple_choice", item), prepend=tokenizer.get_bos_token_id())
    assert len(prompt) > 8
    model = Oracle(tokenizer.get_vocab_size(), [prompt], sequence_len=8, positions=80)  # trained at 8 tokens
    assert core_eval.evaluate_example(model, tokenizer, "multiple_choice", item, [], " ", "cpu")
    model = Oracle(tokenizer.get_vocab_size(), [prompt], sequence_len=1, positions=3)
    with pytest.raises(ValueError, match="does not fit the model's 3 positions with its scored tokens whole"):
        core_eval.evaluate_example(model, tokenizer, "multiple_choice", item, [], " ", "cpu")


def test_prompts_render_like_the_reference_templates():
    shots = [MC[1], MC[3]]
    assert core_eval.render_prompts("multiple_choice", MC[0], shots, " ")[2] == (
        "Question: which is winter? winter\n\nQuestion: bright or quiet? bright\n\nQuestion: which is the river? the garden")
    assert core_eval.render_prompts("schema", SCHEMA[0], [SCHEMA[1]], " ") == [
        "In the morning the light was early\n\nThe river was cold so we swam",
        "In the morning the light was early\n\nThe garden was cold so we swam"]
    without, with_continuation = core_eval.render_prompts("language_modeling", LM[0], [LM[1]], " ")
    assert without == "Seven and seven make fourteen\n\nThe capital of the garden is"
    assert with_continuation == "Seven and seven make fourteen\n\nThe capital of the garden is the river"


def test_scoring_spans():
    assert core_eval.scoring_spans("multiple_choice", [[1, 2, 3, 4], [1, 2, 5], [1, 2, 6, 7, 8]]) == [(2, 4), (2, 3), (2, 5)]
    assert core_eval.scoring_spans("schema", [[1, 9, 3, 4], [2, 3, 4]]) == [(2, 4), (1, 3)]
    assert core_eval.scoring_spans("language_modeling", [[1, 2], [1, 2, 3, 4]]) == [(2, 4)]


def zip_bundle(bundle, archive):
    """The bundle folder zipped as the real archive holds it: one top-level eval_bundle/ folder."""
    with zipfile.ZipFile(archive, "w") as z:
        for folder, _, files in os.walk(bundle):
            for name in files:
                path = os.path.join(folder, name)
                z.write(path, os.path.relpath(path, os.path.dirname(bundle)))


def test_bundle_is_unpacked_once_from_a_local_zip(base_dir, tmp_path):
    base_dir.mkdir(parents=True)
    zip_bundle(write_bundle(str(tmp_path / "eval_bundle")), base_dir / "eval_bundle.zip")
    path = core_eval.get_eval_bundle()
    assert path == str(base_dir / "eval_bundle") and len(core_eval.load_tasks(path)) == 3
    assert core_eval.get_eval_bundle() == path  # second call: already there


def test_offline_without_bundle_is_one_clear_error(base_dir):
    base_dir.mkdir(parents=True, exist_ok=True)
    with pytest.raises(UserError, match="cannot reach karpathy-public.*place eval_bundle.zip"):
        core_eval.get_eval_bundle()


def test_a_zip_that_is_not_the_bundle_says_to_delete_it_and_leaves_nothing_half_made(base_dir, tmp_path):
    base_dir.mkdir(parents=True)
    archive = base_dir / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("eval_bundle/readme.txt", "not the bundle")
    for _ in range(2):  # the second run says the same, rather than tripping over the first's leftovers
        with pytest.raises(UserError, match=f"{archive} is not the CORE eval bundle \\(no core.yaml inside\\): delete it"):
            core_eval.get_eval_bundle()
        assert sorted(os.listdir(base_dir)) == ["eval_bundle.lock", "eval_bundle.zip"]
    os.makedirs(base_dir / "eval_bundle" / "eval_data")  # a half-made bundle an older run left behind
    zip_bundle(write_bundle(str(tmp_path / "eval_bundle")), archive)
    assert len(core_eval.load_tasks(core_eval.get_eval_bundle())) == 3
    os.remove(base_dir / "eval_bundle" / "eval_data" / "mini" / "lm_task.jsonl")
    with pytest.raises(UserError, match="eval bundle at .* is damaged \\(FileNotFoundError.*lm_task.jsonl.*\\): delete it"):
        core_eval.load_tasks(core_eval.get_eval_bundle())
