"""Chat with a knowledge base (--kb): the passages an answer read come back as citations, in the OpenAI-compatible API
(whole and streamed), on the UI's stream and in a real browser; chat_cli shows its searches. Real servers on 127.0.0.1."""

import json
import threading

import pytest
import torch

from nanochat.common import UserError
from nanochat.engine import Engine
from nanochat.retrieval import KnowledgeBase
from nanochat.serving import Worker
from scripts import chat_web
from test_chat_web import (CHROMIUM, CHROMIUM_ARGS, DONE, free_port, make_chat_model_dir, needs_chromium, post,
                           sse_events, start_server)
from test_engine import ToolUser

FACTS = {
    "Orla Venn": "Orla Venn is a painter who was born in the harbour town of Kestrel Bay.",
    "Kestrel Bay": "Kestrel Bay is a harbour town on a cold northern coast whose mayor is Tomas Quill.",
    "Bread": "Bread is baked from flour, water, salt and yeast in a hot oven.",
}
QUESTION = "In which harbour town was the painter Orla Venn born?"


def build_facts(root, monkeypatch):
    corpus = root / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"id": t, "title": t, "text": text}) + "\n" for t, text in FACTS.items()))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    return KnowledgeBase.build("facts", [corpus], dense=False)


@pytest.fixture(scope="module")
def context_server(tmp_path_factory, tokenizer):
    """chat_web as users start it, answering with the passages a search for each question finds placed before it."""
    root = tmp_path_factory.mktemp("rag")
    make_chat_model_dir(root, tokenizer, sequence_len=4096)  # the test tokenizer's few tokens split passages finely
    with pytest.MonkeyPatch.context() as mp:
        build_facts(root, mp)
    proc, url = start_server(root, "-m", "8", "--kb", "facts", "--rag-mode", "context", "--passages", "2")
    yield url
    proc.terminate()
    proc.communicate(timeout=30)


def test_context_mode_returns_the_passages_it_placed_before_the_question(context_server):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "temperature": 0}
    status, text = post(context_server + "/v1/chat/completions", body)
    assert status == 200
    message = json.loads(text)["choices"][0]["message"]
    [citation] = message["citations"]
    assert citation["query"] == QUESTION
    assert [p["title"] for p in citation["passages"]][0] == "Orla Venn"  # BM25 puts the painter's passage first
    assert citation["passages"][0] == {"id": "Orla Venn#0", "title": "Orla Venn", "text": FACTS["Orla Venn"],
                                       "source": "facts.jsonl:1"}  # the file and row, not the server's folders
    # the prompt holds the passages: it is longer than the question alone, by their tokens
    assert json.loads(text)["usage"]["prompt_tokens"] > 30

    status, text = post(context_server + "/v1/chat/completions", {**body, "stream": True, "n": 2})
    chunks = sse_events(text)
    cited = [c["choices"][0] for c in chunks if "citations" in c["choices"][0]["delta"]]
    assert [c["index"] for c in cited] == [0, 1] and chunks.index(next(c for c in chunks if c["choices"][0]["delta"])) == 0
    assert all(c["delta"]["citations"] == [citation] for c in cited)  # first, before any text, for each choice
    status, text = post(context_server + "/chat/completions", body)
    events = sse_events(text)
    assert events[0] == {"citation": citation, "index": 0} and "token" in events[1]
    status, text = post(context_server + "/v1/chat/completions",  # too long once its passages are placed before it
                        {**body, "messages": [{"role": "user", "content": "harbour town " * 600}]})
    assert status == 400 and "with the passages placed before its question, the conversation is" in text


@needs_chromium
def test_the_ui_shows_an_answers_sources_folded_under_it(context_server, tmp_path):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(context_server)
        page.fill("#chat-input", QUESTION)
        page.keyboard.press("Enter")
        page.wait_for_selector(".message.assistant .citations")  # the citation comes first, then the answer
        page.wait_for_function(DONE)
        sources = page.locator(".message.assistant .citations")
        assert sources.locator("summary").inner_text() == "Sources: 2 passages from 1 search"
        assert not sources.locator(".passage").first.is_visible()  # folded until clicked
        sources.locator("summary").click()
        assert sources.locator(".query").inner_text() == f"search: {QUESTION}"
        first = sources.locator(".passage").first
        assert first.is_visible() and first.inner_text().startswith(f"[1] Orla Venn {FACTS['Orla Venn']}")
        page.screenshot(path=str(tmp_path / "citations.png"))
        # the next question sends the conversation back as plain messages: citations stay in the page
        page.fill("#chat-input", "And who is the mayor of Kestrel Bay?")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('.message.assistant .citations').length === 2")
        page.wait_for_function(DONE)
        assert "Kestrel Bay" in page.locator(".message.assistant .citations .query").nth(1).text_content()
        browser.close()


@pytest.fixture
def search_server(tmp_path, tokenizer, monkeypatch):
    """The app over a model that searches twice, then answers: as chat_web serves a model RAG SFT taught to search."""
    import uvicorn
    kb = build_facts(tmp_path, monkeypatch)
    sp = tokenizer.encode_special
    calls = ["search: where was Orla Venn born", "search: mayor of Kestrel Bay"]
    script = [t for call in calls for t in (sp("<|python_start|>"), *tokenizer.encode(call), sp("<|python_end|>"))]
    script += [*tokenizer.encode("Tomas Quill"), sp("<|assistant_end|>")]

    model = ToolUser(script, tokenizer.get_vocab_size(), sp("<|output_start|>"), sp("<|output_end|>"))
    model.config.sequence_len = 1024
    model.cos = torch.zeros(1, 10 * 1024, 1, 1)
    worker = Worker(Engine(model, tokenizer, kb, "bm25", 2, compile=False), torch.device("cpu"), 0)
    server = uvicorn.Server(uvicorn.Config(chat_web.create_app([worker]), log_level="warning"))
    sock = chat_web.listening_socket("127.0.0.1", free_port())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)


def test_search_mode_cites_each_search_an_answer_ran(search_server):
    url = search_server
    body = {"messages": [{"role": "user", "content": "Who is the mayor of the town where Orla Venn was born?"}],
            "max_tokens": 300, "temperature": 0}
    status, text = post(url + "/v1/chat/completions", body)
    assert status == 200
    choice = json.loads(text)["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == ("[search: where was Orla Venn born -> Orla Venn]"
                                            "[search: mayor of Kestrel Bay -> Kestrel Bay; Orla Venn]Tomas Quill")
    citations = choice["message"]["citations"]
    assert [c["query"] for c in citations] == ["where was Orla Venn born", "mayor of Kestrel Bay"]
    assert [[p["title"] for p in c["passages"]] for c in citations] == [["Orla Venn"], ["Kestrel Bay", "Orla Venn"]]
    status, text = post(url + "/v1/chat/completions", {**body, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in sse_events(text) if c.get("choices")]
    streamed = [d["citations"][0] for d in deltas if "citations" in d]
    assert streamed == citations
    first_search = next(i for i, d in enumerate(deltas) if "search: where" in d.get("content", ""))
    assert deltas[first_search + 1] == {"citations": [citations[0]]}  # each citation right after its search shows


def test_rag_flags_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="^--rag-mode=context places passages from a knowledge base before each "
                                        "question: give --kb NAME$"):
        chat_web.main(["--rag-mode", "context"])
    with pytest.raises(UserError, match="^no knowledge base"):
        chat_web.main(["--kb", "nothing"])
