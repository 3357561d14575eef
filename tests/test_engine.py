import contextlib
import json
import threading

import pytest
import torch

from nanochat.engine import Engine, KVCache, draw, sample_next_token, use_calculator
from test_gpt import tiny_model


@pytest.fixture
def model_and_tokenizer(tokenizer):
    return tiny_model(vocab_size=tokenizer.get_vocab_size()).eval(), tokenizer


def test_greedy_engine_equals_naive_generation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("the river and the garden", prepend=tokenizer.get_bos_token_id())
    naive = list(model.generate(prompt, 40, temperature=0))
    engine = [column[0] for column, _ in Engine(model, tokenizer).generate(prompt, max_tokens=40, temperature=0)]
    assert engine == naive[:len(engine)] and len(engine) >= 1
    # several greedy samples are all the same sequence
    sequences, _ = Engine(model, tokenizer, compile=False).generate_batch(prompt, num_samples=3, max_tokens=20, temperature=0)
    assert sequences[0] == sequences[1] == sequences[2]


@pytest.mark.parametrize("top_k", [None, 0, 5])
def test_sampled_engine_equals_naive_generation_with_the_same_seed(model_and_tokenizer, top_k):
    """One sampler for both (top_k 0 means the whole vocabulary, as in the reference, not an error)."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("the river", prepend=tokenizer.get_bos_token_id())
    naive = list(model.generate(prompt, 30, temperature=1.0, top_k=top_k, seed=7))
    engine = [column[0] for column, _ in Engine(model, tokenizer).generate(prompt, max_tokens=30, temperature=1.0,
                                                                           top_k=top_k, seed=7)]
    assert engine == naive[:len(engine)] and len(engine) >= 1
    assert list(model.generate(prompt, 5, temperature=1e-38)) == list(model.generate(prompt, 5, temperature=0))


def test_compiled_decoding_gives_eager_decodings_tokens(tokenizer):
    """The compiled step over a StaticKVCache (whole buffer, masked; position as a tensor) is the eager step: the same
    greedy and sampled tokens, past a short window, with grouped-query attention, for one sample and several. Two
    graphs serve it all (batch 1, and larger batches), whatever the cache size."""
    from torch._dynamo.utils import counters
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), sequence_len=128, window_short=12).eval()
    prompt = tokenizer.encode("the river and the garden", prepend=tokenizer.get_bos_token_id())
    compiled, eager = Engine(model, tokenizer), Engine(model, tokenizer, compile=False)
    assert compiled.compiled and not eager.compiled
    graphs = counters["stats"]["unique_graphs"]
    for samples, temperature, max_tokens in ((1, 0.0, 90), (3, 1.0, 90), (1, 1.0, 30), (5, 1.0, 40), (2, 0.0, 60)):
        runs = [list(e.generate(prompt, num_samples=samples, max_tokens=max_tokens, temperature=temperature, seed=3))
                for e in (compiled, eager)]
        assert runs[0] == runs[1] and len(runs[0]) > 12  # past the window (greedy may stop at an end token)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert not Engine(tiny_model(vocab_size=tokenizer.get_vocab_size(), mixer_pattern="AM"), tokenizer).compiled


def test_compiled_decoding_past_the_recompile_limit_decodes_eagerly(tokenizer):
    """Once a process has compiled recompile_limit graphs of the model's forward (many kinds of model), torch.compile
    makes no new one: the engine then decodes eagerly, says so, and gives eager decoding's tokens (its later steps
    skip guard checks only after a compiled first step, or they would run another model's graph or fail)."""
    torch._dynamo.reset()  # no graphs yet: the first model's is the one allowed
    prompt = tokenizer.encode("the river and the garden", prepend=tokenizer.get_bos_token_id())
    for n_layer in (2, 3):
        model = tiny_model(vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer).eval()
        engine = Engine(model, tokenizer)
        with (torch._dynamo.config.patch(recompile_limit=1),
              pytest.warns(UserWarning, match="recompile_limit") if n_layer == 3 else contextlib.nullcontext()):
            tokens = list(engine.generate(prompt, max_tokens=20, temperature=0))
        assert tokens == list(Engine(model, tokenizer, compile=False).generate(prompt, max_tokens=20, temperature=0))
        assert engine.compiled == (n_layer == 2)


def test_draw_samples_the_distribution_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).expand(20000, -1)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0))[:, 0], minlength=5) / 20000
    assert counts[1] == counts[4] == 0 and torch.allclose(counts, probs[0], atol=0.015)
    with pytest.raises(ValueError, match="logits are not finite"):  # NaN logits (an overflow) fail, not sample junk
        sample_next_token(torch.tensor([[0.0, float("nan")]]), torch.Generator())


def test_answers_end_where_the_trained_context_does_unless_allowed_past_it(tokenizer):
    """Generation stops at the context the model was trained on, whatever max_tokens asks; past_context lets it run
    to the rotary tables' end."""
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), sequence_len=8).eval()  # 80 positions
    with torch.no_grad():  # the end tokens never win a greedy step, so every answer runs as far as it may
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    prompt = tokenizer.encode("the river", prepend=tokenizer.get_bos_token_id())
    for engine, positions in ((Engine(model, tokenizer, compile=False), 8),
                              (Engine(model, tokenizer, past_context=True, compile=False), 80)):
        budget = engine.answer_budget(len(prompt), 1000)
        assert budget == positions - len(prompt)
        for max_tokens in (1000, None, budget):
            assert len(list(engine.generate(prompt, max_tokens=max_tokens, temperature=0))) == budget
        assert len(list(engine.generate(prompt, max_tokens=2, temperature=0))) == 2
    assert Engine(model, tokenizer, compile=False).answer_budget(len(prompt) + 5, 1000) == 0  # a prompt past the context: no answer
    assert list(Engine(model, tokenizer, compile=False).generate(list(range(10)), max_tokens=5)) == []


def test_sampling_is_seeded_and_first_tokens_differ(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, compile=False)
    prompt = [tokenizer.get_bos_token_id()]
    first = next(engine.generate(prompt, num_samples=16, max_tokens=5, temperature=1.0, seed=1))[0]
    assert len(set(first)) > 1  # every sample draws its own first token from the shared prefill
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    assert a == b
    assert all(len(s) <= 1 + 12 for s in a)


def test_top_k_and_greedy_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0]] * 2)
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0).tolist() == [[1], [1]]
    draws = {sample_next_token(logits, rng, temperature=5.0, top_k=2)[0, 0].item() for _ in range(200)}
    assert draws == {1, 2}


@pytest.mark.parametrize("temperature", [1e-38, 5e-324, 1e-6, 1e-5, 1e-4])
def test_tiny_temperatures_sample_the_argmax_without_nan(temperature):
    # the model's logits are soft-capped at 15: 15 / 1e-38 overflows fp32, and softmax of inf is NaN
    logits = torch.tensor([[0.0, 15.0, 14.99, -15.0]] * 3)
    for top_k in (None, 2):
        tokens = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=temperature, top_k=top_k)
        assert tokens.tolist() == [[1]] * 3


class ScriptedModel(torch.nn.Module):
    """Emits a fixed script, one token per position, through a real KV cache: the Engine's tool machinery is under test."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.config = type("Config", (), {"sequence_len": 512, "n_kv_head": 1, "n_embd": 4, "n_head": 1, "n_layer": 1})()
        self.compute_dtype = torch.float32
        self.windows = [512]  # one attention layer
        self.cos = torch.zeros(1, 10 * 512, 1, 1)  # a rotary table's length: all the Engine reads of it
        self.seen = []  # the token columns the engine fed back

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        if kv_cache.pos > 0:  # a decode step (not the prompt's prefill)
            self.seen.append(idx[:, 0].tolist())
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        step = len(self.seen)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


def test_tool_call_output_is_forced_into_the_stream(tokenizer):
    sp = tokenizer.encode_special
    expression = tokenizer.encode("12*3+1")
    script = [*tokenizer.encode("ok "), sp("<|python_start|>"), *expression, sp("<|python_end|>"),
              *[0] * 6, sp("<|assistant_end|>")]
    model = ScriptedModel(script, tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer, compile=False)
    columns = list(engine.generate([tokenizer.get_bos_token_id()], num_samples=2, max_tokens=40, temperature=0))
    tokens = [c[0] for c, _ in columns]
    masks = [m[0] for _, m in columns]
    end_of_call = tokens.index(sp("<|python_end|>"))
    forced = [sp("<|output_start|>"), *tokenizer.encode("37"), sp("<|output_end|>")]
    assert tokens[end_of_call + 1:end_of_call + 1 + len(forced)] == forced
    assert masks[end_of_call + 1:end_of_call + 1 + len(forced)] == [0] * len(forced)
    assert set(masks[:end_of_call + 1]) == {1}
    assert model.seen[end_of_call + 1][0] == sp("<|output_start|>")  # the forced tokens are fed back to the model
    assert tokens[-1] == sp("<|assistant_end|>") and len(columns) < 40
    sequences, seq_masks = engine.generate_batch([tokenizer.get_bos_token_id()], num_samples=1, max_tokens=40, temperature=0)
    assert sp("<|assistant_end|>") not in sequences[0] and len(sequences[0]) == len(seq_masks[0])


class ToolUser(ScriptedModel):
    """Writes its script in order, one token per step, waiting while the Engine forces a tool's output (it reads
    <|output_start|> ... <|output_end|> fed back, as a model reads them) and going on after. A prefill starts over."""

    def __init__(self, script, vocab_size, output_start, output_end):
        super().__init__(script, vocab_size)
        self.output_start, self.output_end, self.at, self.in_output = output_start, output_end, 0, False

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        if kv_cache.pos == 0:
            self.at, self.in_output = 0, False
        else:
            token = idx[0, 0].item()
            self.seen.append(token)
            if token == self.output_start or self.in_output:
                self.in_output = token != self.output_end
            elif token == self.script[self.at]:  # its own token came back: write the next one
                self.at = min(self.at + 1, len(self.script) - 1)
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[self.at]] = 10.0
        return logits


def test_multi_hop_answers_run_each_search_and_read_its_passages_unsupervised(tokenizer, tmp_path):
    from nanochat.engine import TextStream
    from nanochat.retrieval import KnowledgeBase, format_passages
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": t, "title": t, "text": text}) + "\n" for t, text in [
        ("Orla Venn", "Orla Venn is a painter who was born in the harbour town of Kestrel Bay."),
        ("Kestrel Bay", "Kestrel Bay is a harbour town whose mayor is Tomas Quill."),
        ("Bread", "Bread is baked from flour, water, salt and yeast.")]))
    kb = KnowledgeBase.build("people", [corpus], dense=False)
    sp = tokenizer.encode_special
    queries = ["search: where was Orla Venn born", "search: mayor of Kestrel Bay"]
    script = [*tokenizer.encode("ok"), *[t for q in queries for t in (sp("<|python_start|>"), *tokenizer.encode(q),
                                                                   sp("<|python_end|>"))],
              *tokenizer.encode("Tomas Quill"), sp("<|assistant_end|>")]
    engine = Engine(ToolUser(script, tokenizer.get_vocab_size(), sp("<|output_start|>"), sp("<|output_end|>")),
                    tokenizer, kb, passages=2)
    columns = list(engine.generate([tokenizer.get_bos_token_id()], max_tokens=400, temperature=0))
    tokens, masks = [c[0] for c, _ in columns], [m[0] for _, m in columns]
    assert tokens[-1] == sp("<|assistant_end|>")
    # each search ran, in order, and its passages came back as forced tool output, never trained on
    starts = [i for i, t in enumerate(tokens) if t == sp("<|output_start|>")]
    ends = [i for i, t in enumerate(tokens) if t == sp("<|output_end|>")]
    assert len(starts) == len(ends) == 2
    for query, start, end in zip(queries, starts, ends):
        passages = kb.search(query[len("search:"):].strip(), 2)
        assert tokenizer.decode(tokens[start + 1:end]) == format_passages(passages)
        assert set(masks[start:end + 1]) == {0}
    assert sum(masks) == len(script)  # everything the model wrote, and only that, is trained on
    stream = TextStream(tokenizer, engine.search)
    shown = "".join(stream.push(t) for t in tokens[:-1])
    assert shown == ("ok[search: where was Orla Venn born -> Orla Venn]"  # BM25 finds no other passage with its words
                     "[search: mayor of Kestrel Bay -> Kestrel Bay; Orla Venn]Tomas Quill")
    assert stream.searches == ["where was Orla Venn born", "mayor of Kestrel Bay"]
    # without a knowledge base the model is told so, and goes on
    engine = Engine(ToolUser(script, tokenizer.get_vocab_size(), sp("<|output_start|>"), sp("<|output_end|>")), tokenizer)
    tokens = [c[0] for c, _ in engine.generate([tokenizer.get_bos_token_id()], max_tokens=400, temperature=0)]
    assert tokenizer.decode(tokens).count("<|output_start|>no knowledge base is loaded<|output_end|>") == 2


def test_kv_cache_prefill_replicates_rows():
    small = KVCache(1, 2, 8, 4, 3, "cpu", torch.float32)
    small.insert(0, torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))
    small.advance(5)
    embeddings = torch.randn(1, 5, 16)
    assert not small.recent("embedding", embeddings, keep=1).any()  # nothing came before the first token
    big = KVCache(3, 2, 20, 4, 3, "cpu", torch.float32)
    big.prefill(small)
    assert big.pos == 5 and big.k[0][:, :, :5].eq(1).all() and not big.k[0][:, :, 5:].any()
    assert torch.equal(big.recent("embedding", torch.randn(3, 1, 16), keep=1), embeddings[:, -1:].expand(3, 1, 16))
    with pytest.raises(ValueError, match="overflow"):
        big.insert(0, torch.ones(3, 2, 16, 4), torch.ones(3, 2, 16, 4))


@pytest.mark.parametrize("expr, result", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("7/2", 3.5), ("24/3", 8), ("7//2", 3), ("-4+10", 6), ("1,000 * 3", 3000), ("2.5*4", 10.0),
    ("'strawberry'.count('r')", 3), ('"Mississippi".lower().count("s")', 4),
])
def test_calculator_evaluates_arithmetic_and_count(expr, result):
    assert use_calculator(expr) == result


@pytest.mark.parametrize("expr", [
    "2**10", "__import__('os').system('ls')", "open('x').read()", "'a'.join(['b'])", "x + 1", "1/0",
    "'abc'.count()", "len('abc')", "'abc'.__class__", "(" * 500 + "1" + ")" * 500, "", "1 +", "'a' * 3",
])
def test_calculator_refuses_everything_else(expr):
    assert use_calculator(expr) is None


def test_calculator_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(use_calculator("6*7")))
    thread.start()
    thread.join()
    assert results == [42]
