"""Conversations from a jsonl file: each line a list of {"role", "content"} messages (or {"messages": [...]})."""

import json

from nanochat.common import UserError
from tasks.common import Task


class CustomJSON(Task):
    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.conversations = []
        try:
            with open(filepath) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    messages = row["messages"] if isinstance(row, dict) else row
                    if not isinstance(messages, list) or not messages:
                        raise UserError(f"{filepath}:{n}: expected a list of messages")
                    self.conversations.append({"messages": messages})
        except FileNotFoundError:
            raise UserError(f"{filepath} does not exist") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{filepath}: line {e.lineno} is not valid JSON") from None

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
