"""
The BPE tokenizer: trained with rustbpe (fast, Rust), run with tiktoken (fast, Rust), in GPT-4's style.
Also renders chat conversations into token ids plus a loss mask for finetuning.
"""

import copy
import hashlib
import os
import pickle
from functools import cached_property, lru_cache

from nanochat.common import UserError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; the loader packs rows so that each row starts with one
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced into the stream
]
# Fill-in-the-middle sentinels (nanochat/fim.py), only in tokenizers trained with tok_train --fim: appended after the
# specials above, so their ids (and every tokenizer trained without them) stay as they were
FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (not 3): at d12 with 32K vocab,
# {1,2} gave 0.965 val bpb vs 0.972 for {1,3}, and spends fewer vocab slots on numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


MAX_VOCAB_SIZE = 2**31 - 1  # token ids are int32 in the loader (rustbpe's u32 overflows at 2**32)


def special_tokens(fim=False):
    return SPECIAL_TOKENS + (FIM_TOKENS if fim else [])


def check_vocab_size(vocab_size, fim=False):
    """Refuse sizes rustbpe cannot take: it panics below 256 (a panic is not an Exception), overflows past u32."""
    specials = len(special_tokens(fim))
    minimum = 256 + specials
    if vocab_size < minimum:
        raise UserError(f"--vocab-size={vocab_size} is too small: it must be at least {minimum} (256 bytes + {specials} special tokens)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"--vocab-size={vocab_size} is too large: it must be at most {MAX_VOCAB_SIZE:,} (token ids are "
                        "32-bit; GPT-4's vocabulary is ~100K)")


class EncodingUnpickler(pickle.Unpickler):
    """Loads a pickled tiktoken Encoding and nothing else: a plain pickle.load runs whatever code a tokenizer.pkl from
    the Hub names. An Encoding pickles as its class plus a dict of str/bytes/int (see pickletools.dis on a saved one)."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a tokenizer.pkl holds only a tiktoken Encoding")


class RustBPETokenizer:
    """A tiktoken Encoding with nanochat's special tokens appended after the BPE ranks."""

    def __init__(self, enc, bos_token="<|bos|>"):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, fim=False):
        """fim: also the three fill-in-the-middle sentinels (FIM_TOKENS), after the other specials."""
        import rustbpe
        import tiktoken
        check_vocab_size(vocab_size, fim)
        names = special_tokens(fim)
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, vocab_size - len(names), pattern=SPLIT_PATTERN)
        ranks = dict(bpe.get_mergeable_ranks())
        specials = {name: len(ranks) + i for i, name in enumerate(names)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise UserError(f"no tokenizer at {path}: run python -m scripts.tok_train first")
        try:
            with open(path, "rb") as f:
                return cls(EncodingUnpickler(f).load())
        except Exception as e:  # a truncated or foreign pickle fails in many ways
            raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:80]}): it is damaged or incomplete; "
                            "retrain it with python -m scripts.tok_train (then retrain the models, which depend on it)") from None

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """OpenAI's encodings (gpt2, cl100k_base) for comparison; they use <|endoftext|> as BOS. Needs internet once."""
        import tiktoken
        return cls(tiktoken.get_encoding(tiktoken_name), bos_token="<|endoftext|>")

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        with open(path + ".tmp", "wb") as f:
            pickle.dump(self.enc, f)
        os.replace(path + ".tmp", path)
        return path

    @cached_property
    def _fingerprint(self):
        digest = hashlib.sha256(self.enc._pat_str.encode())
        for i in range(self.enc.n_vocab):  # every token's bytes in id order, the specials by name
            piece = self.enc.decode_single_token_bytes(i)
            digest.update(len(piece).to_bytes(4, "little") + piece)
        return digest.hexdigest()[:16]

    def fingerprint(self):
        """A short hash of the split pattern and every token, stored in checkpoints: a retrained tokenizer of the
        same size maps text to other ids, and a model would then read garbage."""
        return self._fingerprint

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def get_bos_token_id(self):
        return self.bos_token_id

    def has_fim(self):
        """Was it trained with tok_train --fim (the fill-in-the-middle sentinels)?"""
        return all(name in self.enc.special_tokens_set for name in FIM_TOKENS)

    def special_token_ids(self):
        return {self.enc.encode_single_token(name) for name in self.enc.special_tokens_set}

    @lru_cache(maxsize=32)
    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def decode_single_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self):
        """Each token's length in raw UTF-8 bytes (0 for special tokens): bits-per-byte divides by these."""
        specials = self.special_token_ids()
        return [0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.get_vocab_size())]

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        Encode a string, or a list of strings in parallel. Plain text never yields special tokens.
        prepend/append: a token id or a special token's name, added to each sequence.
        """
        if isinstance(prepend, str):
            prepend = self.encode_special(prepend)
        if isinstance(append, str):
            append = self.encode_special(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])
        if not isinstance(text, list):
            raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")
        batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        if prepend is not None:
            batch = [[prepend] + ids for ids in batch]
        if append is not None:
            for ids in batch:
                ids.append(append)
        return batch

    __call__ = encode

    def decode(self, ids):
        return self.enc.decode(ids)

    # -------------------------------------------------------------------------
    # Chat rendering

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Token ids and a 0/1 mask (1 = the model is trained to produce this token) for one conversation:
        {"messages": [{"role": "system"|"user"|"assistant", "content": str | [parts]}, ...]}.
        Assistant content may be a list of parts {"type": "text"|"python"|"python_output", "text": str}.
        """
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            # no system role in the format: fold it into the first user message
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            messages = copy.deepcopy(messages)
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        if not messages:
            raise ValueError("a conversation needs at least one message")

        ids, mask = [], []

        def add(token_ids, supervised):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        special = self.encode_special
        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} has role {message['role']!r} but {expected!r} was expected: "
                                 "messages must alternate user/assistant, starting with user (after an optional system message)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string, not {type(content).__name__}")
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":  # the model writes tool calls: supervised
                        add(special("<|python_start|>"), 1)
                        add(self.encode(text), 1)
                        add(special("<|python_end|>"), 1)
                    elif kind == "python_output":  # the tool writes its output at inference: not supervised
                        add(special("<|output_start|>"), 0)
                        add(self.encode(text), 0)
                        add(special("<|output_end|>"), 0)
                    else:
                        raise ValueError(f"message {i}: unknown part type {kind!r} (text, python or python_output)")
            else:
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
            add(special("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """
        The prompt for the model's next assistant turn, ending with <|assistant_start|>. A conversation that ends
        with an assistant message (a task's reference answer, in RL and evals) has that message dropped first;
        one that ends with a user message (a chat) is used whole.
        """
        messages = conversation["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("render_for_completion needs a conversation whose last user message awaits an answer")
        ids, _ = self.render_conversation({**conversation, "messages": messages}, max_tokens=10**9)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """A terminal picture of tokens: green = supervised (mask 1), red = not; specials in bold."""
        green, red, bold, reset = "\033[92m", "\033[91m", "\033[1m", "\033[0m"
        specials = self.special_token_ids()
        pieces = []
        for token_id, m in zip(ids, mask):
            text = self.id_to_token(token_id)
            if with_token_id:
                text += f"({token_id})"
            style = (green if m else red) + (bold if token_id in specials else "")
            pieces.append(f"{style}{text}{reset}")
        return "|".join(pieces)


def tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return RustBPETokenizer.from_directory(tokenizer_dir())


def get_token_bytes(device="cpu", vocab_size=None):
    """Each token's length in bytes, as tok_train saved it; checked to fit the tokenizer (get_tokenizer()'s by default)."""
    import torch
    path = os.path.join(tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise UserError(f"no token_bytes.pt at {path}: run python -m scripts.tok_train first")
    try:
        token_bytes = torch.load(path, map_location=device)
    except Exception as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}): it is damaged or incomplete; "
                        "retrain the tokenizer with python -m scripts.tok_train") from None
    vocab_size = get_tokenizer().get_vocab_size() if vocab_size is None else vocab_size
    integers = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    is_tensor = isinstance(token_bytes, torch.Tensor)
    if not (is_tensor and token_bytes.dtype in integers and token_bytes.shape == (vocab_size,)):
        found = f"a {token_bytes.dtype} tensor of shape {tuple(token_bytes.shape)}" if is_tensor else f"a {type(token_bytes).__name__}"
        raise UserError(f"{path} holds {found}, not one integer per token of the {vocab_size:,}-token tokenizer: "
                        "retrain the tokenizer with python -m scripts.tok_train")
    return token_bytes
