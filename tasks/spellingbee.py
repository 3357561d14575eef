"""
Spelling tasks, made from an English word list (the `english-words` package, so no download is needed):
- SpellingBee: "how many r are in strawberry?" The answer spells the word out and counts by hand, then checks with
  the calculator ('strawberry'.count('r')), and ends with "#### <count>".
- SimpleSpelling: "spell apple" -> "a,p,p,l,e". Small models see words as tokens, not letters; this teaches letters.
"""

import random
from functools import lru_cache

from tasks.common import Task
from tasks.gsm8k import extract_answer

TEMPLATES = [
    "How many {letter} are in the word {word}?", "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter}'s in {word}.", "In the word '{word}', how many '{letter}' are there?",
    "how many {letter}s in {word}", "What is the count of the letter {letter} in \"{word}\"?",
    "Can you tell me how many {letter} letters {word} has?", "Number of {letter} in {word}?",
    "How often does {letter} occur in the word {word}?", "Tell me how many {letter}'s there are in {word}.",
    "I'm curious: how many {letter} does {word} contain?", "Quick question, how many {letter} in '{word}'?",
    "Please count the {letter}s in the word {word}.", "{word}: how many {letter}?",
    "If you spell {word}, how many times do you write {letter}?", "Does {word} have any {letter}? How many?",
    "¿Cuántas letras {letter} hay en la palabra {word}?", "Combien de {letter} y a-t-il dans le mot {word} ?",
    "Wie viele {letter} sind im Wort {word}?", "Quantas letras {letter} tem a palavra {word}?",
]
SPELL_TEMPLATES = ["Spell the word: {word}", "How do you spell {word}?", "spell {word}", "Spell out {word} letter by letter.",
                   "Can you spell '{word}' for me?", "Write out the letters of {word}."]
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@lru_cache(maxsize=1)
def words():
    from english_words import get_english_words_set
    return sorted(w for w in get_english_words_set(["web2"], alpha=True, lower=True) if 3 <= len(w) <= 14)


def spelling_answer(word, letter):
    count = word.count(letter)
    tally, running = [], 0
    for ch in word:
        running += ch == letter
        tally.append(f"{ch}{'=' + str(running) if ch == letter else ''}")
    return [
        {"type": "text", "text": f"Let me spell {word} and count the letter {letter}:\n{', '.join(tally)}\n"
                                 f"By hand I count {count}. Let me check with Python: "},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nThe word {word} has {count} {letter}'s.\n\n#### {count}"},
    ]


class SpellingBee(Task):
    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test")
        self.size, self.seed = size, 0 if split == "train" else 10_000_000  # other draws than train's, from the same words

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(self.seed + index)
        word = rng.choice(words())
        letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(ALPHABET)
        question = rng.choice(TEMPLATES).format(letter=letter, word=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": spelling_answer(word, letter)}]}

    def evaluate(self, conversation, completion):
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(extract_answer(completion) == reference)


class SimpleSpelling(Task):
    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test")
        self.size, self.seed = size, 1 if split == "train" else 20_000_000

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(self.seed + index)
        word = rng.choice(words())
        return {"messages": [{"role": "user", "content": rng.choice(SPELL_TEMPLATES).format(word=word)},
                             {"role": "assistant", "content": ",".join(word)}]}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])
