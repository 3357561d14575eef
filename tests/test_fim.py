"""Fill in the middle end to end: the tokenizer option, the loader's transform, base_train's flags, infill() and the
/v1/completions endpoint of a real server, on tiny real models and the test tokenizer's corpus."""

import json

import pytest
import torch

from conftest import make_docs
from nanochat import dataset
from nanochat.common import UserError
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.engine import Engine
from nanochat.fim import FimTransform, fim_prompt, infill
from nanochat.tokenizer import FIM_TOKENS, SPECIAL_TOKENS, RustBPETokenizer, check_vocab_size, get_tokenizer
from test_chat_web import call, make_chat_model_dir, start_server
from test_engine import ScriptedModel

B, T = 4, 64


@pytest.fixture(scope="module")
def fim_tokenizer():
    """The conftest tokenizer's corpus and merge count (400 - 9 specials), trained with --fim: 3 more tokens."""
    return RustBPETokenizer.train_from_iterator(iter(make_docs(400, seed=1)), 403, fim=True)


@pytest.fixture
def data_dir(tmp_path):
    docs = make_docs(600, seed=7, min_words=2, max_words=60)
    out = tmp_path / "shards"
    out.mkdir()
    dataset.write_shard(docs[:500], str(out / dataset.shard_name(0)))
    dataset.write_shard(docs[500:], str(out / dataset.shard_name(1)))
    return str(out)


def loader(tokenizer, data_dir, **kwargs):
    return tokenizing_distributed_data_loader(tokenizer, B, T, "train", buffer_size=50, tokenizer_batch_size=16,
                                              data_dir=data_dir, **kwargs)


def batches(it, n):
    return [torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in (next(it) for _ in range(n))]


def test_tokenizer_option_appends_the_fim_tokens_and_old_tokenizers_are_unchanged(tokenizer, fim_tokenizer, tmp_path):
    assert not tokenizer.has_fim() and tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    assert fim_tokenizer.has_fim() and fim_tokenizer.get_vocab_size() == 403
    # the existing specials keep their ids, the FIM ones come after them, and text encodes exactly as before
    assert [fim_tokenizer.encode_special(s) for s in SPECIAL_TOKENS] == [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    assert [fim_tokenizer.encode_special(s) for s in FIM_TOKENS] == [400, 401, 402]
    text = "doc00001 the river café <|fim_prefix|> is plain text"
    assert fim_tokenizer.encode(text) == tokenizer.encode(text) and fim_tokenizer.decode(fim_tokenizer.encode(text)) == text
    assert fim_tokenizer.token_bytes()[400:] == [0, 0, 0]  # bits per byte skips them, like the other specials
    for tok, folder in ((tokenizer, "old"), (fim_tokenizer, "fim")):
        tok.save(str(tmp_path / folder))
        loaded = RustBPETokenizer.from_directory(str(tmp_path / folder))
        assert loaded.has_fim() == tok.has_fim() and loaded.fingerprint() == tok.fingerprint()
    check_vocab_size(265)
    with pytest.raises(UserError, match=r"--vocab-size=265 is too small: it must be at least 268 \(256 bytes \+ 12 special"):
        check_vocab_size(265, fim=True)


def test_tok_train_fim_flag(base_dir):
    from scripts import tok_train
    data = base_dir / "base_data_climbmix"
    data.mkdir(parents=True)
    docs = make_docs(300, seed=3)
    dataset.write_shard(docs[:200], str(data / dataset.shard_name(0)))
    dataset.write_shard(docs[200:], str(data / dataset.shard_name(1)))
    with pytest.raises(UserError, match="at least 268"):
        tok_train.main(["--fim", "--vocab-size=266"])
    tok_train.main(["--fim", "--vocab-size=320"])
    trained = get_tokenizer()
    assert trained.has_fim() and trained.get_vocab_size() == 320
    assert [trained.encode_special(s) for s in FIM_TOKENS] == [317, 318, 319]
    assert torch.load(base_dir / "tokenizer" / "token_bytes.pt").shape == (320,)


@pytest.mark.parametrize("spm", [False, True])
def test_psm_and_spm_layouts(fim_tokenizer, spm):
    tok = fim_tokenizer
    bos, (p, s, m) = tok.get_bos_token_id(), (tok.encode_special(name) for name in FIM_TOKENS)
    fim = FimTransform(tok, rate=1.0, spm_rate=float(spm))
    texts = make_docs(40, seed=5)
    ids = [(0, 0, row) for row in range(len(texts))]
    for doc_id, text, tokens in zip(ids, texts, fim.encode(ids, texts)):
        chose_spm, i, j = fim.choose(doc_id, text)
        assert chose_spm == spm and 0 <= i <= j <= len(text)
        prefix, middle, suffix = (tok.encode(piece) for piece in (text[:i], text[i:j], text[j:]))
        if spm:
            assert tokens == [bos, p, s, *suffix, m, *prefix, *middle]
        else:
            assert tokens == [bos, p, *prefix, s, *suffix, m, *middle]
        assert [tokens.count(t) for t in (bos, p, s, m)] == [1, 1, 1, 1]
        assert tok.decode(prefix + middle + suffix) == text  # nothing lost or added at the cuts


def test_rate_is_honoured_and_lower_rates_pick_a_subset(fim_tokenizer):
    texts = ["x" * 50] * 3000
    ids = [(k // 1000, k % 7, k) for k in range(3000)]
    higher = FimTransform(fim_tokenizer, 0.5, 0.3)
    plans = [higher.choose(i, t) for i, t in zip(ids, texts)]
    chosen = [plan for plan in plans if plan]
    assert 0.46 < len(chosen) / 3000 < 0.54 and 0.26 < sum(spm for spm, _, _ in chosen) / len(chosen) < 0.34
    lower = FimTransform(fim_tokenizer, 0.2, 0.3)
    assert all(plans[k] or not lower.choose(ids[k], texts[k]) for k in range(3000))
    assert not any(FimTransform(fim_tokenizer, 0.0).choose(i, "abc") for i in ids[:300])


def test_rate_zero_is_todays_stream(tokenizer, fim_tokenizer, data_dir):
    today = batches(loader(tokenizer, data_dir), 6)
    assert all(torch.equal(a, b) for a, b in zip(today, batches(loader(tokenizer, data_dir, fim_rate=0.0), 6)))
    # a --fim tokenizer at rate 0: the same ids too (the BPE part is the same)
    assert all(torch.equal(a, b) for a, b in zip(today, batches(loader(fim_tokenizer, data_dir), 6)))


def test_loader_fim_is_deterministic_resumable_and_train_only(tokenizer, fim_tokenizer, data_dir):
    it = loader(fim_tokenizer, data_dir, fim_rate=0.5)
    seen, states = [], []
    for _ in range(30):  # past the 500 train documents: a second epoch, and a resume point with a full buffer
        x, y, state = next(it)
        seen.append(torch.cat([x, y[:, -1:]], dim=1))
        states.append(json.loads(json.dumps(state)))
    stream = torch.cat(seen).flatten().tolist()
    p, s, m = (fim_tokenizer.encode_special(name) for name in FIM_TOKENS)
    assert stream.count(p) > 50 and stream.count(m) > 50
    again = batches(loader(fim_tokenizer, data_dir, fim_rate=0.5), 30)
    assert all(torch.equal(a, b) for a, b in zip(seen, again))
    resumed = loader(fim_tokenizer, data_dir, fim_rate=0.5, resume_state=states[9])
    assert all(torch.equal(a, b) for a, b in zip(seen[10:], batches(resumed, 20)))
    with pytest.raises(ValueError, match="training documents only, not the val split"):
        next(tokenizing_distributed_data_loader(fim_tokenizer, B, T, "val", data_dir=data_dir, fim_rate=0.5))
    with pytest.raises(UserError, match=r"^the tokenizer has no fill-in-the-middle tokens: retrain it with "
                                        r"python -m scripts.tok_train --fim"):
        next(loader(tokenizer, data_dir, fim_rate=0.5))


class PromptRecorder(ScriptedModel):
    """Writes a fixed middle then <bos> (the document's end), and keeps the prompt it was given."""

    def forward(self, idx, kv_cache=None):
        if kv_cache.pos == 0:
            self.prompt = idx[0].tolist()
        return super().forward(idx, kv_cache)


def test_infill_renders_psm_and_stops_at_the_document_end(tokenizer, fim_tokenizer):
    tok = fim_tokenizer
    script = [*tok.encode(" quiet river"), tok.get_bos_token_id(), *tok.encode(" never")]
    model = PromptRecorder(script, tok.get_vocab_size())
    assert infill(Engine(model, tok, compile=False), "the garden and the", " stone END.") == " quiet river"
    assert model.prompt == fim_prompt(tok, "the garden and the", " stone END.")
    p, s, m = (tok.encode_special(name) for name in FIM_TOKENS)
    assert model.prompt == [tok.get_bos_token_id(), p, *tok.encode("the garden and the"), s, *tok.encode(" stone END."), m]
    engine = Engine(PromptRecorder(script, tok.get_vocab_size()), tok)  # a fresh script
    assert infill(engine, "a", "b", max_tokens=1) == tok.decode(script[:1])
    with pytest.raises(ValueError, match="more than this model reads"):
        infill(engine, "river " * 600, "")
    with pytest.raises(ValueError, match="has no fill-in-the-middle tokens, so it cannot infill"):
        infill(Engine(ScriptedModel([0], tokenizer.get_vocab_size()), tokenizer), "a", "b")


def test_prepare_text_refuses_a_suffix_without_fim_tokens(tokenizer):
    from nanochat.serving import CompletionRequest, RequestError, prepare_text
    engine = Engine(ScriptedModel([0], tokenizer.get_vocab_size()), tokenizer)
    defaults = dict(temperature=0.0, top_k=0, max_tokens=8)
    tokens, settings = prepare_text(CompletionRequest(prompt="the river"), tokenizer, engine, defaults)
    assert tokens == tokenizer.encode("the river", prepend=tokenizer.get_bos_token_id()) and settings["max_tokens"] == 8
    with pytest.raises(RequestError, match="suffix: this model's tokenizer has no fill-in-the-middle tokens") as e:
        prepare_text(CompletionRequest(prompt="the river", suffix=" END."), tokenizer, engine, defaults)
    assert e.value.param == "suffix" and e.value.status == 400


def test_completions_endpoint(fim_tokenizer, tmp_path):
    """One real server over a tiny model that never ends its documents; the API key guards the endpoint."""
    from nanochat import checkpoint_manager as cm
    from openai import OpenAI
    make_chat_model_dir(tmp_path, fim_tokenizer, sequence_len=256)
    key = "sk-fim"
    proc, url = start_server(tmp_path, "-m", "16", env={"NANOCHAT_API_KEY": key})
    headers = {"Authorization": f"Bearer {key}"}
    try:
        def complete(body, expect=200):
            status, _, text = call(url + "/v1/completions", body, headers=headers)
            assert status == expect, text
            return text if body.get("stream") else json.loads(text)

        infilled = complete({"prompt": "the garden", "suffix": " END.", "max_tokens": 6, "temperature": 0})
        assert infilled["object"] == "text_completion" and infilled["id"].startswith("cmpl-")
        assert infilled["choices"][0]["finish_reason"] == "length" and infilled["choices"][0]["index"] == 0
        prompt = fim_prompt(fim_tokenizer, "the garden", " END.")
        assert infilled["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}
        # the same model in this process infills the same text: the server renders the same PSM prompt
        model, _ = cm.build_model(str(tmp_path / "base_checkpoints" / "d4"), 1, "cpu", torch.float32, "eval")
        expected = infill(Engine(model, fim_tokenizer, compile=False), "the garden", " END.", max_tokens=6, temperature=0)
        assert infilled["choices"][0]["text"] == expected

        plain = complete({"prompt": "the garden", "max_tokens": 5, "temperature": 0})
        assert plain["usage"]["prompt_tokens"] == 1 + len(fim_tokenizer.encode("the garden"))
        events = [json.loads(line[6:]) for line in complete({"prompt": "the garden", "suffix": " END.", "max_tokens": 6,
                                                             "temperature": 0, "stream": True}).splitlines()
                  if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == expected
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["length"]
        if len(expected) > 2:  # a stop string ends the middle early, and is left out
            stop = expected[len(expected) // 2:len(expected) // 2 + 2]
            stopped = complete({"prompt": "the garden", "suffix": " END.", "max_tokens": 6, "temperature": 0, "stop": stop})
            assert stopped["choices"][0] == {"index": 0, "text": expected[:expected.index(stop)], "logprobs": None,
                                             "finish_reason": "stop"}
        client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        reply = client.completions.create(model="nanochat", prompt="the garden", suffix=" END.", max_tokens=6, temperature=0)
        assert reply.choices[0].text == expected

        too_long = complete({"prompt": "river " * 400}, 400)["error"]
        assert too_long["param"] == "prompt" and "more than this model reads (256)" in too_long["message"]
        assert complete({"prompt": "a", "temperature": 9}, 400)["error"]["param"] == "temperature"
        assert complete({"suffix": "a"}, 400)["error"]["param"] == "prompt"
        assert call(url + "/v1/completions", {"prompt": "a"})[0] == 401
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_base_train_fim_flags_loss_falls_and_meta_records_them(fim_tokenizer, tokenizer, base_dir, capsys, monkeypatch):
    from nanochat.common import get_compute_dtype
    from scripts import base_train
    from test_base_train import TINY, make_workspace
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    get_compute_dtype.cache_clear()
    for flag in ("--fim-rate=1.5", "--fim-spm-rate=-0.1", "--fim-rate=nan"):
        with pytest.raises(UserError, match=f"^{flag.split('=')[0]}=.* must be between 0 and 1"):
            base_train.main([*TINY, flag])
    tokenizer.save(str(base_dir / "tokenizer"))
    with pytest.raises(UserError, match=r"^--fim-rate=0.5: the tokenizer has no fill-in-the-middle tokens: "
                                        r"retrain it with python -m scripts.tok_train --fim"):
        base_train.main([*TINY, "--fim-rate=0.5"])

    make_workspace(base_dir / "fim", fim_tokenizer)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir / "fim"))
    base_train.main([*TINY, "--fim-rate=0.5", "--num-iterations=20", "--eval-every=-1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = [loss for _, loss in result["curve"]["train_loss"]]
    assert result["step"] == 20 and losses[-1] < losses[0] - 0.25, losses  # a debiased moving average: it lags
    meta = json.loads((base_dir / "fim" / "base_checkpoints" / "d2" / "meta_000020.json").read_text())
    assert (meta["user_config"]["fim_rate"], meta["user_config"]["fim_spm_rate"]) == (0.5, 0.5)
    with pytest.raises(UserError, match=r"step 20 read its data otherwise \(--fim-rate: saved 0.5, now 0.0\)"):
        base_train.main([*TINY, "--num-iterations=30", "--resume-from-step=20"])
    get_compute_dtype.cache_clear()
