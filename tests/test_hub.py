"""
The Hub as users meet it, without the Hub: a real olah server on 127.0.0.1 serves git repos this file writes through
the Hub's HTTP API, and scripts.hub pulls from it with the real huggingface_hub. olah takes no uploads, so a push is
checked up to its upload call (the planned files, committed to a repo olah serves and pulled back byte-identical);
the upload call itself runs only against the real Hub, when HF_TOKEN is set.
"""

import dataclasses
import json
import contextlib
import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from conftest import make_docs
from nanochat import checkpoint_manager as cm
from nanochat.common import UserError
from nanochat.engine import Engine
from nanochat import hub
from nanochat.hub import RepoFile, push, push_plan, same_file
from nanochat.tokenizer import RustBPETokenizer
from scripts.hub import main
from test_gpt import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(base, tokenizer, source="sft", tag="d4", step=1, shards=0, seed=0):
    """A tiny real checkpoint (optimizer shards from `shards` ranks) and its tokenizer, as training leaves them."""
    model = tiny_model(seed=seed, vocab_size=tokenizer.get_vocab_size())
    checkpoint_dir = os.path.join(base, cm.SOURCES[source], tag)
    for rank in range(max(shards, 1)):
        cm.save_checkpoint(checkpoint_dir, step, model.state_dict(), {"rank": rank} if shards else None, rank)
    cm.save_meta(checkpoint_dir, step, {"step": step, "model_config": dataclasses.asdict(model.config),
                                        "tokenizer": tokenizer.fingerprint()})
    tokenizer.save(os.path.join(base, "tokenizer"))
    torch.save(torch.tensor(tokenizer.token_bytes(), dtype=torch.int32), os.path.join(base, "tokenizer", "token_bytes.pt"))
    return checkpoint_dir


def publish(mirrors, name, files):
    """Commit files [(local path, path in the repo)] to the git repo olah serves as me/<name>; returns 'me/<name>'."""
    repo_dir = os.path.join(mirrors, "models", "me", name)
    for path, in_repo in files:
        os.makedirs(os.path.dirname(os.path.join(repo_dir, in_repo)), exist_ok=True)
        shutil.copyfile(path, os.path.join(repo_dir, in_repo))
    git = ["git", "-C", repo_dir, "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "push"]):
        subprocess.run(git + cmd, check=True)
    return f"me/{name}"


def published_from(tmp, mirrors, tokenizer, name, **planned):
    """A repo holding what a push of a tiny model would upload (planned by push_plan); returns (repo, files)."""
    base = os.path.join(tmp, name)
    save_tiny_model(base, tokenizer, shards=2)
    os.makedirs(os.path.join(base, "report"), exist_ok=True)
    with open(os.path.join(base, "report", "report.md"), "w") as f:
        f.write("# nanochat report\n\nCORE 0.0\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", base)
        files, _, _ = push_plan("sft", **planned)
    return publish(mirrors, name, files), files


@pytest.fixture(scope="module")
def olah(tmp_path_factory, tokenizer):
    """
    (endpoint, mirrors folder, me/tiny's pushed files): an olah server, offline, serving the git repos under
    mirrors/models/<org>/<name>, and me/tiny in it (published while olah boots): an sft d4 checkpoint with 2 optimizer
    shards, its tokenizer and a report card, as pushed.
    """
    root = tmp_path_factory.mktemp("olah")
    port, mirrors = free_port(), root / "mirrors"
    mirrors.mkdir()
    (root / "configs.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "cache"}"\nmirrors-path = ["{mirrors}"]\n'
        'metadata-cache-ttl = 0\n[accessibility]\noffline = true\n')
    log = open(root / "olah.log", "w+")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "olah-cli"), "-c", "configs.toml"],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        _, pushed = published_from(str(root / "pushed"), str(mirrors), tokenizer, "tiny", with_optimizer=True)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail("olah did not start:\n" + log.read())
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", str(mirrors), pushed
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def pull(endpoint, *flags):
    """scripts.hub pull as a user runs it, in this process (faster than a subprocess)."""
    main(["pull", "--endpoint", endpoint, *flags])


def test_a_pulled_model_chats_and_a_second_pull_downloads_nothing(olah, base_dir, capfd):
    repo, pushed = "me/tiny", olah[2]
    proc = subprocess.run([sys.executable, "-m", "scripts.hub", "pull", "--repo", repo, "--endpoint", olah[0]], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    checkpoint_dir = str(base_dir / "chatsft_checkpoints" / "d4")
    assert result["action"] == "pull" and result["checkpoint_dir"] == checkpoint_dir and result["step"] == 1
    assert result["tokenizer"] == "installed" and not os.path.exists(base_dir / "hub_pull-me--tiny")
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000001.json", "model_000001.pt", "report.md"]  # no optimizer
    assert sorted(os.listdir(base_dir / "tokenizer")) == ["token_bytes.pt", "tokenizer.pkl"]
    assert result["bytes"] == sum(os.path.getsize(p) for p, in_repo in pushed if "optim_" not in in_repo)

    model, tokenizer, meta = cm.load_model("sft", "cpu", torch.float32)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "the river"}]})
    tokens = [column[0] for column, _ in Engine(model, tokenizer, compile=False).generate(prompt, max_tokens=4, temperature=0)]
    assert len(tokens) >= 1 and meta["tokenizer"] == tokenizer.fingerprint()

    pull(olah[0] + "/", "--repo", repo)  # all here: nothing to download (and the endpoint's trailing / is dropped)
    again = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert again["downloaded"] == [] and again["endpoint"] == olah[0]
    model_file = os.path.join(checkpoint_dir, "model_000001.pt")
    with open(model_file, "r+b") as f:  # same size, one byte off: only the hash tells
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match=f"^{model_file} differs from me/tiny's: pass --overwrite to replace it with "
                                        "the repo's, or pull into another NANOCHAT_BASE_DIR$"):
        pull(olah[0], "--repo", repo)  # it may be a checkpoint trained here: never replaced unasked
    pull(olah[0], "--repo", repo, "--overwrite")
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["downloaded"] == ["sft/d4/model_000001.pt"]
    original = next(p for p, in_repo in pushed if in_repo == "sft/d4/model_000001.pt")
    assert open(model_file, "rb").read() == open(original, "rb").read()


def test_push_plans_the_checkpoint_its_tokenizer_and_report(base_dir, tokenizer):
    save_tiny_model(base_dir, tokenizer, step=1)
    save_tiny_model(base_dir, tokenizer, step=2, shards=2)
    save_tiny_model(base_dir, tokenizer, tag="d2", step=5)  # (a d4 inside: only the tag counts)
    files, tag, step = push_plan("sft")
    assert (tag, step) == ("d4", 2)  # the largest d<N> and its last step, as load_model picks them
    assert [in_repo for _, in_repo in files] == ["sft/d4/model_000002.pt", "sft/d4/meta_000002.json",
                                                 "tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt"]
    (base_dir / "report").mkdir(exist_ok=True)
    (base_dir / "report" / "report.md").write_text("# report\n")
    files, _, _ = push_plan("sft", with_optimizer=True)
    assert dict((in_repo, path) for path, in_repo in files) == {
        "sft/d4/model_000002.pt": str(base_dir / "chatsft_checkpoints/d4/model_000002.pt"),
        "sft/d4/meta_000002.json": str(base_dir / "chatsft_checkpoints/d4/meta_000002.json"),
        "sft/d4/optim_000002_rank0.pt": str(base_dir / "chatsft_checkpoints/d4/optim_000002_rank0.pt"),
        "sft/d4/optim_000002_rank1.pt": str(base_dir / "chatsft_checkpoints/d4/optim_000002_rank1.pt"),
        "tokenizer/tokenizer.pkl": str(base_dir / "tokenizer/tokenizer.pkl"),
        "tokenizer/token_bytes.pt": str(base_dir / "tokenizer/token_bytes.pt"),
        "report/report.md": str(base_dir / "report/report.md")}
    with pytest.raises(UserError, match="--with-optimizer, but .*d4 step 1 has no optimizer state"):
        push_plan("sft", step=1, with_optimizer=True)
    assert [in_repo for _, in_repo in push_plan("sft", model_tag="d2")[0]][:2] == ["sft/d2/model_000005.pt",
                                                                                   "sft/d2/meta_000005.json"]
    other = RustBPETokenizer.train_from_iterator(iter(make_docs(200, seed=7)), tokenizer.get_vocab_size())
    other.save(str(base_dir / "tokenizer"))  # a retrained tokenizer: pushing would publish a model that reads garbage
    with pytest.raises(UserError, match="is not the one .*d4 was trained with"):
        push_plan("sft")


def test_push_then_pull_round_trip_is_byte_identical(olah, tmp_path, tokenizer, base_dir):
    repo, pushed = published_from(str(tmp_path), olah[1], tokenizer, "roundtrip", with_optimizer=True)
    pull(olah[0], "--repo", repo, "--with-optimizer")
    landed = {"sft/d4/": base_dir / "chatsft_checkpoints/d4/", "tokenizer/": base_dir / "tokenizer/",
              "report/": base_dir / "chatsft_checkpoints/d4/"}
    assert len(pushed) == 7
    for path, in_repo in pushed:
        folder, _, name = in_repo.rpartition("/")
        assert open(landed[folder + "/"] / name, "rb").read() == open(path, "rb").read(), in_repo


def test_pull_errors_say_what_to_do(olah, monkeypatch):
    endpoint = olah[0]
    with pytest.raises(UserError, match=f"{endpoint} has no model repo me/nope that you may read: check --repo"):
        pull(endpoint, "--repo", "me/nope")
    with pytest.raises(UserError, match=r"me/tiny has no base checkpoint \(it holds sft/d4\): pick --source"):
        pull(endpoint, "--repo", "me/tiny", "--source", "base")
    with pytest.raises(UserError, match=r"me/tiny has no sft/d9 \(it holds sft/d4\): pick --model-tag"):
        pull(endpoint, "--repo", "me/tiny", "-g", "d9")
    with pytest.raises(UserError, match=r"me/tiny has no step 7 of sft/d4 \(it holds 1\)"):
        pull(endpoint, "--repo", "me/tiny", "--step", "7")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    with pytest.raises(UserError, match=f"cannot reach {closed} .*Connection refused.*: check the network"):
        pull(closed, "--repo", "me/tiny")
    assert time.time() - t0 < 10  # not a speed claim: a retry loop with backoff would take ~30 s
    with socket.socket() as silent:  # takes connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr(hub, "TIMEOUT", 1)
        with pytest.raises(UserError, match="cannot reach .* \\(timed out\\): check the network"):
            pull(f"http://127.0.0.1:{silent.getsockname()[1]}", "--repo", "me/tiny")
    with pytest.raises(UserError, match="--repo='tiny' must name a Hub model repo as USER/NAME"):
        pull(endpoint, "--repo", "tiny")
    for bad in ("me/a--b", "me/a..b", "me/-ab"):  # the Hub's own rules, checked here
        with pytest.raises(UserError, match=f"^--repo='{re.escape(bad)}' must name a Hub model repo as USER/NAME "
                                            r"\(or ORG/NAME\): .*'" + re.escape(bad)):
            pull(endpoint, "--repo", bad)
    with pytest.raises(UserError, match=r"^--endpoint \(or HF_ENDPOINT\) 'http://\[::1' is no URL \(Invalid IPv6 URL\)"):
        pull("http://[::1", "--repo", "me/tiny")


def test_a_pull_never_clobbers_another_tokenizer(olah, base_dir, tokenizer):
    other = RustBPETokenizer.train_from_iterator(iter(make_docs(200, seed=7)), tokenizer.get_vocab_size())
    other.save(str(base_dir / "tokenizer"))
    ours = (base_dir / "tokenizer" / "tokenizer.pkl").read_bytes()
    with pytest.raises(UserError, match=f"holds another \\({other.fingerprint()}\\), which the checkpoints here may "
                                        "need: pass --replace-tokenizer"):
        pull(olah[0], "--repo", "me/tiny")
    assert (base_dir / "tokenizer" / "tokenizer.pkl").read_bytes() == ours
    assert not (base_dir / "chatsft_checkpoints").exists()  # nothing landed
    staging = base_dir / "hub_pull-me--tiny" / "sft" / "d4"  # and the model was never downloaded, only its meta
    assert (staging / "meta_000001.json").exists() and not (staging / "model_000001.pt").exists()
    pull(olah[0], "--repo", "me/tiny", "--replace-tokenizer")
    assert (base_dir / f"tokenizer-{other.fingerprint()}" / "tokenizer.pkl").read_bytes() == ours  # kept aside
    _, loaded, _ = cm.load_model("sft", "cpu", torch.float32)
    assert loaded.fingerprint() == tokenizer.fingerprint()


def test_push_without_a_token_or_network_is_one_line(base_dir, tokenizer, tmp_path, monkeypatch):
    import huggingface_hub
    save_tiny_model(base_dir, tokenizer)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # as if never logged in
    with pytest.raises(UserError, match="^no Hugging Face token to push with: run `hf auth login`, or set HF_TOKEN to a "
                                        "write token from https://huggingface.co/settings/tokens$"):
        main(["push", "--repo", "me/tiny"])
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a token, and no Hub where the endpoint points
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"^cannot reach {closed} .*Connection refused"):
        main(["push", "--repo", "me/tiny", "--endpoint", closed])


def test_a_kept_tokenizer_gains_the_files_it_lacks(olah, base_dir, tokenizer, capfd):
    tokenizer.save(str(base_dir / "tokenizer"))  # the checkpoint's tokenizer is here, its token_bytes.pt is not
    pull(olah[0], "--repo", "me/tiny")
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert result["tokenizer"] == "kept" and result["downloaded"] == ["tokenizer/token_bytes.pt", "report/report.md",
                                                                      "sft/d4/model_000001.pt", "sft/d4/meta_000001.json"]
    pushed = dict((in_repo, path) for path, in_repo in olah[2])
    assert (base_dir / "tokenizer" / "token_bytes.pt").read_bytes() == open(pushed["tokenizer/token_bytes.pt"], "rb").read()


def test_a_push_never_swaps_the_tokenizer_under_other_checkpoints(olah, base_dir, tokenizer):
    other = RustBPETokenizer.train_from_iterator(iter(make_docs(200, seed=7)), tokenizer.get_vocab_size())
    save_tiny_model(base_dir, other, tag="d2")  # trained here with another tokenizer than me/tiny's sft/d4
    files, _, _ = push_plan("sft")
    with pytest.raises(UserError, match=f"^me/tiny's tokenizer/tokenizer.pkl is not {base_dir}/tokenizer/tokenizer.pkl, "
                                        r"and its checkpoints \(sft/d4 step 1\) need theirs: push to another --repo$"):
        push("me/tiny", files, "hf_test", endpoint=olah[0])


def test_same_file_checks_an_lfs_file_by_its_sha256(tmp_path):
    path = tmp_path / "model_000001.pt"
    path.write_bytes(b"weights" * 1000)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    # as the Hub lists a .pt: stored in LFS, so blob_id is the pointer file's sha1, not the content's
    entry = lambda oid: RepoFile(path=path.name, size=7000, oid="0" * 40, lfs={"size": 7000, "oid": oid, "pointerSize": 134})
    assert same_file(path, entry(sha256)) and not same_file(path, entry("1" * 64))
    path.write_bytes(b"weightz" * 1000)  # same size, other bytes
    assert not same_file(path, entry(sha256))


@contextlib.contextmanager
def refusing_hub(answers):
    """
    A tiny HTTP server on 127.0.0.1 that stands in for the Hub's refusals (olah serves, it never refuses): it answers
    each request with answers[method] (a 404 as the Hub says a repo is missing), and keeps [(method, path, JSON body)].
    """
    seen = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def answer(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path.partition("?")[0], json.loads(body) if body else None))
            reply = json.dumps({"error": "not for you"}).encode()
            self.send_response(answers[self.command])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            if answers[self.command] == 404:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_refusal_for_want_of_permission_says_to_log_in(monkeypatch):
    with refusing_hub({"GET": 403}) as (endpoint, seen):
        with pytest.raises(UserError, match=rf"^{endpoint} refused \(403: not for you\): log in with `hf auth login`, "
                                            "or set HF_TOKEN, with the token of an account that may read me/tiny$"):
            pull(endpoint, "--repo", "me/tiny")
        with pytest.raises(UserError, match=r"refused \(403: not for you\): .* with a write token \(https://"):
            push("me/tiny", [], "hf_test", endpoint=endpoint)
    assert seen == [("GET", "/api/models/me/tiny/revision/main", None)] * 2
    with refusing_hub({"GET": 404, "POST": 403}) as (endpoint, seen):  # no such repo: the push creates it
        for private in (False, True):
            with pytest.raises(UserError, match="refused \\(403"):
                push("me/tiny", [], "hf_test", private=private, endpoint=endpoint)
    created = [body for method, path, body in seen if (method, path) == ("POST", "/api/repos/create")]
    # not --private: no visibility asked for, so an org's default (maybe private) holds; never forced public
    assert [body.get("visibility") for body in created] == [None, "private"]


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="live test of the upload to the real Hugging Face Hub: "
                    "set HF_TOKEN (a write token) to run it; it pushes to the private repo <you>/nanochat-hub-test")
def test_live_push_and_pull_through_the_real_hub(base_dir, tokenizer, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    save_tiny_model(base_dir, tokenizer, seed=int(uuid.uuid4().int % 1000))  # new bytes: the commit is never empty
    repo = f"{HfApi().whoami()['name']}/nanochat-hub-test"
    files, _, _ = push_plan("sft")
    commit = push(repo, files, os.environ["HF_TOKEN"], private=True)
    assert commit.oid
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "pulled"))
    main(["pull", "--repo", repo])
    for path, in_repo in files:
        pulled = tmp_path / "pulled" / ("tokenizer" if in_repo.startswith("tokenizer/") else "chatsft_checkpoints/d4")
        assert (pulled / os.path.basename(in_repo)).read_bytes() == open(path, "rb").read(), in_repo
