import json
import pathlib
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import UserError
from nanochat.engine import Engine, use_calculator
from tasks import common
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence, evaluate_generative, render_mc, task_data_path
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, SyntheticMath, extract_answer, solution_parts
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from scripts.chat_sft import IDENTITY
from test_gpt import tiny_model


class Numbers(Task):
    def __init__(self, n, tag, **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return (self.tag, index)


def test_slicing_mixture_and_sequence():
    assert len(Numbers(10, "a", start=2, stop=9, step=3)) == 3  # 2, 5, 8
    assert [Numbers(10, "a", start=2, stop=9, step=3)[i] for i in range(3)] == [("a", 2), ("a", 5), ("a", 8)]
    with pytest.raises(IndexError):
        Numbers(3, "a")[3]
    a, b = Numbers(5, "a"), Numbers(3, "b")
    mix = TaskMixture([a, b, b])
    items = [mix[i] for i in range(len(mix))]
    assert sorted(items) == sorted([("a", i) for i in range(5)] + [("b", i) for i in range(3)] * 2)  # b listed twice
    assert items == [TaskMixture([a, b, b])[i] for i in range(len(mix))]  # deterministic
    assert items != sorted(items)  # shuffled
    assert [TaskSequence([a, b])[i] for i in range(8)] == [("a", i) for i in range(5)] + [("b", i) for i in range(3)]


def test_render_mc_puts_the_letter_right_after_equals():
    prompt = render_mc("2+2?", ["A", "B"], ["3", "4"])
    assert prompt == "Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer."


def test_gsm8k_tool_parts_round_trip():
    answer = "She has 3*4=<<3*4=12>>12 eggs, then 12-5=<<12-5=7>>7.\n#### 7"
    parts = solution_parts(answer)
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    markup = {"text": "{}", "python": "<<{}=", "python_output": "{}>>"}
    assert "".join(markup[p["type"]].format(p["text"]) for p in parts) == answer  # nothing lost or added
    assert [p["text"] for p in parts if p["type"] == "python"] == ["3*4", "12-5"]
    assert extract_answer("so #### 1,234") == "1234" and extract_answer("no answer") is None


def check_renders(task, tokenizer, n=5):
    """Each example renders; only assistant tokens are supervised; tool calls evaluate to their recorded output."""
    for i in range(min(n, len(task))):
        conversation = task[i]
        ids, mask = tokenizer.render_conversation(conversation)
        assert len(ids) == len(mask) and 1 in mask and mask[0] == 0
        assistant = conversation["messages"][-1]["content"]
        if isinstance(assistant, list):
            for call, output in zip(assistant, assistant[1:]):
                if call["type"] == "python":
                    assert output["type"] == "python_output" and str(use_calculator(call["text"])) == output["text"]
        completion = assistant if isinstance(assistant, str) else "".join(p["text"] for p in assistant)
        if hasattr(task, "evaluate") and task.eval_type == "generative" and not isinstance(task, (SmolTalk, CustomJSON)):
            assert task.evaluate(conversation, completion) == 1  # the reference answer passes its own check


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_hub_tasks_from_local_files_in_their_real_format(tmp_path, tokenizer):
    arc = write_jsonl(tmp_path / "arc.jsonl", [{"id": f"q{i}", "question": f"Which is {i}?", "answerKey": "B",
                                                "choices": {"text": ["x", str(i), "y"], "label": ["A", "B", "C"]}} for i in range(6)])
    mmlu = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": ["2+2?", "3+3?"], "subject": ["math", "math"], "choices": [["1", "4", "5", "6"]] * 2,
                             "answer": [1, 3]}), mmlu)
    aux = write_jsonl(tmp_path / "aux.jsonl", [{"train": {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 2,
                                                          "subject": ""}}])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "3 boxes of 4?", "answer": "3*4=<<3*4=12>>12\n#### 12"}])
    smol = write_jsonl(tmp_path / "smol.jsonl", [{"messages": [{"role": "system", "content": "be nice"},
                                                               {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    for task in (ARC("ARC-Easy", "test", local=arc), MMLU("all", "test", local=str(mmlu)),
                 MMLU("auxiliary_train", "train", local=aux), GSM8K("main", "test", local=gsm), SmolTalk("test", local=smol)):
        check_renders(task, tokenizer)
    mc = MMLU("all", "test", local=str(mmlu))
    assert sorted(mc[i]["messages"][1]["content"] for i in range(2)) == ["B", "D"]
    assert mc.evaluate(mc[0], mc[0]["messages"][1]["content"]) == 1 and mc.evaluate(mc[0], "Z") == 0
    assert len(ARC("ARC-Easy", "test", local=arc, stop=4)) == 4


def test_generated_and_packaged_tasks(tokenizer):
    for task in (SyntheticMath(50, "train"), SyntheticMath(50, "test"), SpellingBee(50, "train"), SimpleSpelling(50, "test"),
                 CustomJSON(IDENTITY), HumanEval(stop=3)):
        check_renders(task, tokenizer, n=50)
    assert SpellingBee(5, "train")[0] != SpellingBee(5, "test")[0] and SpellingBee(5)[3] == SpellingBee(5)[3]
    bee = SpellingBee(20, "test")
    assert all(bee.evaluate(bee[i], f"... #### {extract_answer(bee[i]['messages'][1]['content'][-1]['text'])}") for i in range(20))
    assert len(CustomJSON(IDENTITY)) == 300 and len(HumanEval()) == 164


def test_task_data_folder_is_used_before_the_hub(base_dir, tokenizer):
    folder = task_data_path("openai/gsm8k", "main", "test")
    import os
    os.makedirs(folder)
    write_jsonl(__import__("pathlib").Path(folder) / "part0.jsonl", [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    assert len(GSM8K("main", "test")) == 1


def test_offline_hub_dataset_fails_fast_and_says_where_files_go(monkeypatch, base_dir):
    monkeypatch.setattr(common, "hub_reachable", lambda timeout=3.0: False)  # as on a machine without internet
    t0 = time.time()
    with pytest.raises(UserError, match=r"cannot load allenai/ai2_arc/ARC-Challenge \(test\).*task_data/allenai--ai2_arc/ARC-Challenge/test/"):
        ARC("ARC-Challenge", "test")
    assert time.time() - t0 < 10


@pytest.mark.parametrize("hub, make, line, message", [
    (("allenai/ai2_arc", "ARC-Easy", "test"), lambda: ARC("ARC-Easy", "test"), "garbage{",
     r"cannot read the allenai/ai2_arc/ARC-Easy \(test\) files at \S+/ARC-Easy/test\.jsonl \(ArrowInvalid: JSON parse error"),
    (("allenai/ai2_arc", "ARC-Easy", "test"), lambda: ARC("ARC-Easy", "test"), '{"question": "q"}',
     r"the allenai/ai2_arc/ARC-Easy \(test\) files at \S+/ARC-Easy/test\.jsonl have no 'choices' field \(each row needs "
     r"question, choices, answerKey\): fix or remove them"),
    (("cais/mmlu", "all", "test"), lambda: MMLU("all", "test"), '{"question": "q", "choices": ["a"]}', "no 'answer' field"),
    (("cais/mmlu", "auxiliary_train", "train"), lambda: MMLU("auxiliary_train", "train"), '{"answer": 0}', "no 'train' field"),
    (("openai/gsm8k", "main", "test"), lambda: GSM8K("main", "test"), '{"question": "q"}', "no 'answer' field"),
    (("HuggingFaceTB/smol-smoltalk", None, "test"), lambda: SmolTalk("test"), '{"conversation": []}', "no 'messages' field"),
])
def test_damaged_local_task_data_is_one_line(base_dir, hub, make, line, message):
    path = pathlib.Path(task_data_path(*hub) + ".jsonl")
    path.parent.mkdir(parents=True)
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        make()


class Recorded(Task):
    """One question; keeps the completions it is asked to grade."""

    def __init__(self):
        super().__init__()
        self.completions = []

    def num_examples(self):
        return 1

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": "the river and the garden"}, {"role": "assistant", "content": "x"}]}

    def evaluate(self, conversation, completion):
        self.completions.append(completion)
        return 0


def test_generative_eval_answers_stop_where_the_trained_context_ends(tokenizer):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), sequence_len=32).eval()
    stops = torch.tensor([tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()])
    positions = []  # tokens fed to the model per forward: the prompt, then one per step

    def never_ends(module, inputs, logits):
        positions.append(inputs[0].size(1))
        return logits.index_fill(-1, stops, float("-inf"))
    model.register_forward_hook(never_ends)
    task = Recorded()
    assert evaluate_generative(task, tokenizer, Engine(model, tokenizer, compile=False), max_new_tokens=512) == (0, 1)
    assert sum(positions) == 32 and task.completions[0]  # the answer ran to the context's last position


def test_humaneval_is_in_the_references_shuffled_order():
    """The reference evaluates openai_humaneval.shuffle(seed=42): a cap of 24 must pick the same problems."""
    import datasets
    from tasks.humaneval import HumanEval, load_problems
    ids = [p["task_id"] for p in load_problems()]
    reference = datasets.Dataset.from_list([{"task_id": t} for t in ids]).shuffle(seed=42)["task_id"]
    task = HumanEval()
    assert [task[i]["problem"]["task_id"] for i in range(len(task))] == reference and reference[0] != ids[0]


def test_one_chat_evaluation_for_chat_eval_and_sft(tokenizer):
    from test_gpt import tiny_model
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), sequence_len=32).eval()
    results = list(common.evaluate_chat_tasks(["SpellingBee", "SyntheticMath"], model, tokenizer, max_generative=2,
                                              max_new_tokens=8))
    assert [(name, n) for name, _, n in results] == [("SpellingBee", 2), ("SyntheticMath", 2)]
    assert all(0 <= hits <= n for _, hits, n in results)
    with pytest.raises(UserError, match="unknown task 'Trivia': choose from ARC-Easy"):
        common.chat_task("Trivia")
