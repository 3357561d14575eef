"""
Fill in the middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle", arXiv
2207.14255): some pretraining documents are cut at two random characters into prefix, middle and suffix and moved
so that the middle comes last. A left-to-right model then learns to write a middle that joins a given prefix and
suffix, and the paper finds this costs ordinary left-to-right loss nothing ("FIM for free") at rates up to 0.9.

    PSM  <bos><|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM  <bos><|fim_prefix|><|fim_suffix|> suffix <|fim_middle|> prefix middle

The middle ends where the document ends: at the next document's <bos> in the packed row, which is where the Engine
stops, so infill() needs no end token of its own. The loss is plain next-token loss over the whole rearranged document.
"""

import random

from nanochat.common import UserError
from nanochat.tokenizer import FIM_TOKENS

NO_FIM_TOKENS = ("the tokenizer has no fill-in-the-middle tokens: retrain it with python -m scripts.tok_train --fim "
                 "(then pretrain on it: the models depend on it)")
NO_FIM_MODEL = ("this model's tokenizer has no fill-in-the-middle tokens, so it cannot infill: pretrain one on a tokenizer "
                "from python -m scripts.tok_train --fim, with base_train --fim-rate above 0")


def sentinels(tokenizer, error=UserError, message=NO_FIM_TOKENS):
    """The ids of <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>; `error` when the tokenizer lacks them."""
    if not tokenizer.has_fim():
        raise error(message)
    return tuple(tokenizer.encode_special(name) for name in FIM_TOKENS)


class FimTransform:
    """
    The pretraining loader's transform: each document is left whole, or with probability rate rearranged as PSM, or
    SPM with probability spm_rate. A document's choice and cut points come from a generator seeded by its id alone
    (shard, row group, row: what every rank and a resumed loader agree on), so the stream is the same on every run and
    after a resume. The same document gets the same choice in every epoch; pretraining reads far less than one.
    """

    def __init__(self, tokenizer, rate, spm_rate=0.5):
        if not (0 <= rate <= 1 and 0 <= spm_rate <= 1):
            raise ValueError(f"FIM rates are probabilities: rate={rate}, spm_rate={spm_rate}")
        self.tokenizer, self.rate, self.spm_rate = tokenizer, rate, spm_rate
        self.bos = tokenizer.get_bos_token_id()
        self.prefix, self.suffix, self.middle = sentinels(tokenizer)

    def choose(self, doc_id, text):
        """None (the document stays whole) or (spm, i, j): cut before characters i <= j."""
        rng = random.Random("fim:" + ":".join(map(str, doc_id)))  # a str seed hashes with SHA-512: the same everywhere
        if rng.random() >= self.rate:  # drawn first, so a lower rate picks a subset of a higher one's documents
            return None
        spm = rng.random() < self.spm_rate
        i, j = sorted(rng.randint(0, len(text)) for _ in range(2))  # character-level, as in the paper
        return spm, i, j

    def render(self, spm, prefix, middle, suffix):
        """One document's tokens from its pieces' tokens. SPM is the variant the paper trains jointly with PSM (as
        StarCoder does): the PSM sentinel order kept, and the prefix right before the middle, as one run of text."""
        if spm:
            return [self.bos, self.prefix, self.suffix, *suffix, self.middle, *prefix, *middle]
        return [self.bos, self.prefix, *prefix, self.suffix, *suffix, self.middle, *middle]

    def encode(self, doc_ids, texts, num_threads=8):
        """The documents' tokens, <bos> first, each whole or rearranged; every piece is tokenized on its own, as a
        prefix and suffix are at inference."""
        plans = [self.choose(doc_id, text) for doc_id, text in zip(doc_ids, texts)]
        pieces = []
        for plan, text in zip(plans, texts):
            pieces += [text] if plan is None else [text[:plan[1]], text[plan[1]:plan[2]], text[plan[2]:]]
        encoded = iter(self.tokenizer.encode(pieces, num_threads=num_threads))
        return [[self.bos, *next(encoded)] if plan is None else self.render(plan[0], *(next(encoded) for _ in range(3)))
                for plan in plans]


def fim_prompt(tokenizer, prefix, suffix):
    """The PSM prompt for an infill: <bos><|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>.
    ValueError when the tokenizer has no FIM tokens."""
    p, s, m = sentinels(tokenizer, ValueError, NO_FIM_MODEL)
    return [tokenizer.get_bos_token_id(), p, *tokenizer.encode(prefix), s, *tokenizer.encode(suffix), m]


def infill(engine, prefix, suffix, max_tokens=256, temperature=0.0, top_k=None, seed=42):
    """The middle text a FIM-trained model writes between prefix and suffix: up to max_tokens, or until it ends the
    document (<bos>). ValueError when the model cannot infill, or the prompt fills its context."""
    tokenizer = engine.tokenizer
    tokens = fim_prompt(tokenizer, prefix, suffix)
    sequence_len = engine.model.config.sequence_len
    if len(tokens) >= sequence_len:
        raise ValueError(f"prefix and suffix are {len(tokens)} tokens with the FIM tokens, more than this model reads "
                         f"({sequence_len}): shorten them")
    budget = engine.answer_budget(len(tokens), max_tokens)
    (sequence,), _ = engine.generate_batch(tokens, max_tokens=budget, temperature=temperature, top_k=top_k, seed=seed)
    specials = tokenizer.special_token_ids()  # a stray sentinel is no text
    return tokenizer.decode([t for t in sequence[len(tokens):] if t not in specials])
