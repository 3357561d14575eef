"""ARC (allenai/ai2_arc): grade-school science questions, multiple choice. Subsets ARC-Easy and ARC-Challenge."""

from tasks.common import Task, load_hf_dataset, render_mc


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, local=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge") and split in ("train", "validation", "test")
        self.ds = load_hf_dataset("allenai/ai2_arc", subset, split, local,
                                  columns=("question", "choices", "answerKey")).shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters = row["choices"]["label"]  # the dataset's own labels: usually A-D, sometimes 1-4
        user = render_mc(row["question"], letters, row["choices"]["text"])
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["answerKey"]}],
                "letters": letters}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])
