"""SmolTalk (HuggingFaceTB/smol-smoltalk): general conversations, the bulk of midtraining and SFT."""

from tasks.common import Task, load_hf_dataset


class SmolTalk(Task):
    def __init__(self, split="train", local=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test")
        self.ds = load_hf_dataset("HuggingFaceTB/smol-smoltalk", None, split, local, columns=("messages",)).shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        first = 1 if messages[0]["role"] == "system" else 0
        assert len(messages) - first >= 2, "a SmolTalk conversation has at least one exchange"
        for i, m in enumerate(messages[first:]):
            assert m["role"] == ("user" if i % 2 == 0 else "assistant") and isinstance(m["content"], str)
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
