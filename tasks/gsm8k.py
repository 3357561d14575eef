"""
GSM8K (openai/gsm8k): grade-school math word problems whose solutions mark each calculation as <<expr=result>>.
Those become calculator calls: the model learns to write the expression as a python part; the result is the tool's
output part. Answers end with "#### <number>". SyntheticMath makes problems in the same format offline.
"""

import random
import re

from tasks.common import Task, load_hf_dataset

ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text):
    match = ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def solution_parts(answer):
    """Split a solution at its <<expr=result>> spans into text, python and python_output parts."""
    parts = []
    for i, piece in enumerate(re.split(r"(<<[^>]*>>)", answer)):
        if i % 2 == 1:
            expr, _, result = piece[2:-2].rpartition("=")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8KBase(Task):
    def to_conversation(self, question, answer):
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": solution_parts(answer)}]}

    def evaluate(self, conversation, completion):
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(reference is not None and extract_answer(completion) == reference)

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))


class GSM8K(GSM8KBase):
    def __init__(self, subset="main", split="train", local=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic") and split in ("train", "test")
        self.ds = load_hf_dataset("openai/gsm8k", subset, split, local, columns=("question", "answer")).shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return self.to_conversation(row["question"], row["answer"])


NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max", "Nora", "Omar"]
THINGS = [("apples", "basket"), ("pencils", "box"), ("marbles", "bag"), ("stickers", "sheet"), ("cookies", "tray"),
          ("books", "shelf"), ("eggs", "carton"), ("coins", "jar")]


def synthetic_problem(rng):
    """One two-step word problem in GSM8K's format, with its calculator calls."""
    name, (things, holder) = rng.choice(NAMES), rng.choice(THINGS)
    groups, each = rng.randint(2, 12), rng.randint(3, 25)
    total = groups * each
    change = rng.randint(1, total - 1)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{name} has {groups} {holder}s with {each} {things} in each. {name} gives away {change} {things}. How many {things} does {name} have left?"
        final = total - change
        steps = f"{name} has {groups}*{each}=<<{groups}*{each}={total}>>{total} {things}.\nAfter giving away {change}, {name} has {total}-{change}=<<{total}-{change}={final}>>{final} {things}."
    elif kind == 1:
        question = f"{name} buys {groups} {holder}s of {things}. Each {holder} holds {each} {things}, and {name} already had {change}. How many {things} does {name} have now?"
        final = total + change
        steps = f"The {holder}s hold {groups}*{each}=<<{groups}*{each}={total}>>{total} {things}.\nTogether with the {change} from before, that is {total}+{change}=<<{total}+{change}={final}>>{final} {things}."
    else:
        share = rng.randint(2, 6)
        total = groups * each * share
        question = f"{name} has {total} {things} and packs them equally into {groups} {holder}s, then splits each {holder} among {share} friends. How many {things} does each friend get?"
        per_holder = total // groups
        final = per_holder // share
        steps = f"Each {holder} gets {total}/{groups}=<<{total}/{groups}={per_holder}>>{per_holder} {things}.\nEach friend gets {per_holder}/{share}=<<{per_holder}/{share}={final}>>{final} {things}."
    return question, f"{steps}\n#### {final}"


class SyntheticMath(GSM8KBase):
    """Arithmetic word problems made on the fly, for training and testing without the hub. test and train differ."""

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test")
        self.size, self.seed = size, 0 if split == "train" else 10_000_000

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return self.to_conversation(*synthetic_problem(random.Random(self.seed + index)))
