import pytest

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_token_bytes, get_tokenizer, tokenizer_dir

TRICKY = [
    "",
    "hello world",
    "Ünïcödé café naïve — “quotes” and ‘apostrophes’",
    "emoji 🤖👍🏽🇫🇷 and a family 👨‍👩‍👧",
    "中文 日本語 한국어 العربية",
    "numbers 1 12 123 1234567 3.14159 and 2^10=1024",
    "tabs\tand\n\nnew lines\r\n  indented   spaces  ",
    "<|bos|> looks special but is plain text <|assistant_end|>",
]


def conversation(*messages):
    return {"messages": [{"role": role, "content": content} for role, content in messages]}


def test_vocab_has_specials_after_the_bpe_ranks(tokenizer):
    assert tokenizer.get_vocab_size() == 400
    ids = [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(400 - len(SPECIAL_TOKENS), 400))
    assert tokenizer.get_bos_token_id() == ids[0]
    assert tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_plain_text_never_produces_special_tokens(tokenizer):
    specials = {tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    text = " ".join(SPECIAL_TOKENS) + " hello"
    ids = tokenizer.encode(text)
    assert not specials & set(ids)
    assert tokenizer.decode(ids) == text
    for batch_ids in tokenizer.encode([text, "<|user_start|>"]):
        assert not specials & set(batch_ids)


def test_prepend_append_and_batch(tokenizer):
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    plain = tokenizer.encode("the river")
    assert tokenizer.encode("the river", prepend="<|bos|>", append=end) == [bos] + plain + [end]
    batch = tokenizer.encode(["the river", "a garden", ""], prepend=bos)
    assert batch == [[bos] + tokenizer.encode(t) for t in ["the river", "a garden", ""]]
    with pytest.raises(TypeError):
        tokenizer.encode(42)


def test_render_masks_supervise_exactly_the_assistant(tokenizer):
    conv = conversation(("user", "what is the river?"), ("assistant", "a quiet river"),
                        ("user", "and the stone?"), ("assistant", "a silver stone"))
    ids, mask = tokenizer.render_conversation(conv)
    assert len(ids) == len(mask) and ids[0] == tokenizer.get_bos_token_id() and mask[0] == 0
    supervised = [i for i, m in zip(ids, mask) if m]
    end = tokenizer.encode_special("<|assistant_end|>")
    expected = tokenizer.encode("a quiet river") + [end] + tokenizer.encode("a silver stone") + [end]
    assert supervised == expected
    # every user token, including its special delimiters, is unsupervised
    start, stop = ids.index(tokenizer.encode_special("<|user_start|>")), ids.index(tokenizer.encode_special("<|user_end|>"))
    assert set(mask[start:stop + 1]) == {0}
    assert mask[ids.index(tokenizer.encode_special("<|assistant_start|>"))] == 0


def test_system_message_is_merged_into_the_first_user_turn(tokenizer):
    with_system = conversation(("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
    merged = conversation(("user", "be brief\n\nhi"), ("assistant", "hello"))
    assert tokenizer.render_conversation(with_system) == tokenizer.render_conversation(merged)
    assert with_system["messages"][1]["content"] == "hi"  # the caller's conversation is untouched


def test_tool_call_is_supervised_and_its_output_is_not(tokenizer):
    parts = [{"type": "text", "text": "let me count "},
             {"type": "python", "text": "3*7"},
             {"type": "python_output", "text": "21"},
             {"type": "text", "text": " so 21"}]
    ids, mask = tokenizer.render_conversation(conversation(("user", "3 times 7?"), ("assistant", parts)))
    sp = tokenizer.encode_special
    py_start, py_end = ids.index(sp("<|python_start|>")), ids.index(sp("<|python_end|>"))
    out_start, out_end = ids.index(sp("<|output_start|>")), ids.index(sp("<|output_end|>"))
    assert set(mask[py_start:py_end + 1]) == {1}
    assert set(mask[out_start:out_end + 1]) == {0}
    assert tokenizer.decode(ids[out_start + 1:out_end]) == "21"
    assert mask[-1] == 1 and ids[-1] == sp("<|assistant_end|>")


@pytest.mark.parametrize("messages, error", [
    ((("user", "a"), ("user", "b")), "message 1 has role 'user' but 'assistant'"),
    ((("assistant", "a"),), "message 0 has role 'assistant' but 'user'"),
    ((("system", "s"), ("assistant", "a")), "system message must be followed by a user"),
    ((("user", ["not", "a", "string"]),), "user content must be a string"),
    ((("user", "a"), ("assistant", [{"type": "image", "text": "x"}])), "unknown part type 'image'"),
    ((), "at least one message"),
])
def test_render_rejects_malformed_conversations(tokenizer, messages, error):
    with pytest.raises(ValueError, match=error):
        tokenizer.render_conversation(conversation(*messages))


def test_render_truncates_to_max_tokens(tokenizer):
    conv = conversation(("user", "the garden " * 50), ("assistant", "the river " * 50))
    full_ids, full_mask = tokenizer.render_conversation(conv)
    ids, mask = tokenizer.render_conversation(conv, max_tokens=20)
    assert len(full_ids) > 20 and (ids, mask) == (full_ids[:20], full_mask[:20])


def test_render_for_completion(tokenizer):
    conv = conversation(("user", "hi"), ("assistant", "hello there"))
    prompt = tokenizer.render_for_completion(conv)
    ids, _ = tokenizer.render_conversation(conv)
    assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")
    assert prompt == ids[:len(prompt)]  # the prompt is the conversation up to where the answer starts
    assert "hello there" not in tokenizer.decode(prompt)
    # a chat that ends with the user's message is the prompt as it stands
    assert tokenizer.render_for_completion(conversation(("user", "hi"))) == prompt
    with pytest.raises(ValueError, match="last user message awaits an answer"):
        tokenizer.render_for_completion(conversation(("user", "hi"), ("assistant", "a"), ("assistant", "b")))


def test_visualization_marks_supervision(tokenizer):
    ids, mask = tokenizer.render_conversation(conversation(("user", "hi"), ("assistant", "yo")))
    picture = tokenizer.visualize_tokenization(ids, mask, with_token_id=True)
    assert "\033[92m" in picture and "\033[91m" in picture and f"({ids[0]})" in picture


def test_save_load_and_token_bytes(tokenizer, base_dir):
    import torch
    tokenizer.save(tokenizer_dir())
    torch.save(torch.tensor(tokenizer.token_bytes(), dtype=torch.int32), f"{tokenizer_dir()}/token_bytes.pt")
    loaded = get_tokenizer()
    text = TRICKY[3] + TRICKY[2]
    assert loaded.encode(text) == tokenizer.encode(text)
    token_bytes = get_token_bytes()
    assert int(token_bytes[loaded.encode(text)].sum()) == len(text.encode("utf-8"))  # raw bytes, even mid-character
    assert token_bytes[loaded.get_bos_token_id()] == 0 and token_bytes.dtype == torch.int32


def test_a_tokenizer_pickle_that_names_code_is_refused_without_running(tmp_path):
    import os
    import pickle

    class Exploit:  # what a malicious tokenizer.pkl on the Hub would hold: "call os.system(...)" when unpickled
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match=r"^.*tokenizer.pkl cannot be read \(UnpicklingError: refusing to load posix.system"):
        RustBPETokenizer.from_directory(str(tmp_path))
    assert not (tmp_path / "ran").exists()


def test_missing_tokenizer_says_how_to_make_one():
    with pytest.raises(UserError, match="run python -m scripts.tok_train first"):
        get_tokenizer()


def test_vocab_below_bytes_plus_specials_is_a_clear_error():
    # rustbpe would panic (uncatchable by `except Exception`) below 256: we refuse first
    with pytest.raises(UserError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["some text"]), 100)


@pytest.mark.parametrize("content, found", [
    (lambda torch: torch.zeros(10, dtype=torch.int32), r"a torch.int32 tensor of shape \(10,\)"),
    (lambda torch: {"token_bytes": torch.zeros(400, dtype=torch.int32)}, "a dict"),
    (lambda torch: torch.zeros(400), r"a torch.float32 tensor of shape \(400,\)"),
    (lambda torch: torch.zeros(400, 1, dtype=torch.int64), r"a torch.int64 tensor of shape \(400, 1\)"),
])
def test_token_bytes_that_do_not_fit_the_tokenizer(tokenizer, content, found):
    import torch
    tokenizer.save(tokenizer_dir())
    torch.save(content(torch), f"{tokenizer_dir()}/token_bytes.pt")
    with pytest.raises(UserError, match=rf"token_bytes.pt holds {found}, not one integer per token of the 400-token "
                                        r"tokenizer: retrain the tokenizer with python -m scripts.tok_train$"):
        get_token_bytes()
    torch.save(torch.zeros(400, dtype=torch.int32), f"{tokenizer_dir()}/token_bytes.pt")
    with pytest.raises(UserError, match="of the 512-token tokenizer"):  # a caller may name the size it expects
        get_token_bytes(vocab_size=512)


def test_vocab_too_large_for_32_bit_ids_is_a_clear_error():
    with pytest.raises(UserError, match=r"--vocab-size=5000000000 is too large: it must be at most 2,147,483,647"):
        RustBPETokenizer.train_from_iterator(iter(["some text"]), 5_000_000_000)
