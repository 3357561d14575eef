"""MMLU (cais/mmlu): 57 subjects of multiple-choice questions. auxiliary_train is the large training set."""

from tasks.common import Task, load_hf_dataset, render_mc

LETTERS = ("A", "B", "C", "D")


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, local=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), subset
        assert split in (("train",) if subset == "auxiliary_train" else ("validation", "dev", "test")), split
        columns = ("train",) if subset == "auxiliary_train" else ("question", "choices", "answer")
        self.ds = load_hf_dataset("cais/mmlu", subset, split, local, columns).shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        row = row.get("train", row)  # auxiliary_train nests each row under "train"
        user = render_mc(row["question"], LETTERS, row["choices"])
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": LETTERS[row["answer"]]}],
                "letters": LETTERS, "subject": row.get("subject", "")}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])
