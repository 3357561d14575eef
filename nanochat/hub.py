"""
Models on the Hugging Face Hub: push a checkpoint with its tokenizer and report card to a model repo, and pull one
back to where load_model finds it, so that `python -m scripts.chat_web` serves it right away.

One Hub repo holds
    <source>/<tag>/model_XXXXXX.pt, meta_XXXXXX.json   checkpoints (source: base|mid|sft|rl), and optim_XXXXXX_rank*.pt
                                                        when pushed --with-optimizer
    tokenizer/tokenizer.pkl, tokenizer/token_bytes.pt   the tokenizer they were trained with
    report/report.md                                    the report card of the run that made them, when it has one
A pull lands a checkpoint in $NANOCHAT_BASE_DIR/<source's folder>/<tag>/ (its report.md next to it) and the tokenizer
in $NANOCHAT_BASE_DIR/tokenizer/. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT (or endpoint=) names
a mirror. A pull's files must match the repo's listing (size and hash): a file already here that does is not
downloaded again, a checkpoint file here that does not is replaced only when asked (overwrite), one that arrives
damaged is an error.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
from urllib.parse import urlsplit

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import HFValidationError, validate_repo_id

from nanochat.checkpoint_manager import SOURCES, check_tokenizer, checkpoint_steps, find_checkpoint, largest_tag
from nanochat.common import UserError, get_base_dir
from nanochat.report import report_dir
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer, tokenizer_dir

TIMEOUT = 10  # seconds to connect to the Hub and hear back: no network is one line within this, never a hang
TOKENIZER_FILES = ("tokenizer.pkl", "token_bytes.pt")
TOKENS_URL = "https://huggingface.co/settings/tokens"
CHECKPOINT_META = re.compile(rf"({'|'.join(SOURCES)})/([\w.-]*\w[\w.-]*)/meta_(\d+)\.json")  # source, tag (no '..'), step


def check_repo_id(repo):
    try:
        validate_repo_id(repo)  # the Hub's rules: no '--' or '..', no '-' or '.' at either end, at most 96 characters
        problem = None if "/" in repo else "it has no USER/"
    except HFValidationError as e:
        problem = first_line(e)
    if problem:
        raise UserError(f"--repo={repo!r} must name a Hub model repo as USER/NAME (or ORG/NAME): {problem}")


def check_endpoint(endpoint=None):
    """The Hub's URL: endpoint, else HF_ENDPOINT, else huggingface.co, without a trailing slash; or one line why not."""
    url = (endpoint or constants.ENDPOINT).rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # a port that is no number raises only here
    except ValueError as e:
        raise UserError(f"--endpoint (or HF_ENDPOINT) {url!r} is no URL ({e}): give a Hub's, such as "
                        "https://huggingface.co") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--endpoint (or HF_ENDPOINT) {url!r} must be an http:// or https:// URL, such as "
                        "https://huggingface.co")
    return url


def first_line(e):
    text = getattr(e, "server_message", None) or str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0][:160]


@contextlib.contextmanager
def hub_errors(api, repo, writing=False):
    """huggingface_hub's failures as one line each that says what to do."""
    try:
        yield
    except OfflineModeIsEnabled:
        raise UserError(f"HF_HUB_OFFLINE is set, so {api.endpoint} cannot be reached: unset it") from None
    except GatedRepoError:
        raise UserError(f"{repo} is gated: ask for access on {api.endpoint}/{repo}, then log in (`hf auth login` or "
                        "HF_TOKEN) as the account that has it") from None
    except RepositoryNotFoundError:
        raise UserError(f"{api.endpoint} has no model repo {repo} that you may read: check --repo; for a private repo "
                        "log in as an account that may read it (`hf auth login` or HF_TOKEN)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            fix = (f"a write token ({TOKENS_URL}) of an account that may write to {repo}" if writing else
                   f"the token of an account that may read {repo}")
            raise UserError(f"{api.endpoint} refused ({status}: {first_line(e)}): log in with `hf auth login`, or set "
                            f"HF_TOKEN, with {fix}") from None
        if status == 429 or status >= 500:
            raise UserError(f"{api.endpoint} answered {status} for {repo} ({first_line(e)}): try again later") from None
        hint = ("is it a Hugging Face Hub? (a read-only mirror takes no push)" if writing else
                "is --endpoint (or HF_ENDPOINT) a Hub or a mirror of it? If so, run the pull again")
        raise UserError(f"{api.endpoint} refused the request for {repo} ({status}: {first_line(e)}): {hint}") from None
    except LocalEntryNotFoundError as e:  # the download broke off, and no complete copy was here to fall back on
        raise UserError(f"downloading from {api.endpoint} failed ({first_line(e)}): run the pull again, it resumes "
                        "where it stopped") from None
    except Exception as e:
        # no connection, a timeout, a proxy: the HTTP client's TransportError (httpx's, or httpx2's from hub 2.0)
        if not any(c.__name__ == "TransportError" for c in type(e).__mro__):
            raise
        raise UserError(f"cannot reach {api.endpoint} ({first_line(e)}): check the network, or point --endpoint "
                        "(or HF_ENDPOINT) at a Hub or mirror that answers") from None


def same_file(path, entry):
    """Whether path holds the repo's file: same size, then same hash (LFS files: sha256; others: git's blob sha1)."""
    if not os.path.isfile(path) or os.path.getsize(path) != entry.size:
        return False
    digest = hashlib.sha256() if entry.lfs else hashlib.sha1(b"blob %d\0" % entry.size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest() == (entry.lfs.sha256 if entry.lfs else entry.blob_id)


def listing(api, repo, revision=None):
    """{path: RepoFile} of the repo's files (size and hash each) at revision (default: main)."""
    with hub_errors(api, repo):
        return {f.path: f for f in api.list_repo_tree(repo, recursive=True, revision=revision) if isinstance(f, RepoFile)}


# -----------------------------------------------------------------------------
# Push

def push_token():
    """The token a push needs: HF_TOKEN, else the one `hf auth login` saved."""
    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token to push with: run `hf auth login`, or set HF_TOKEN to a write token "
                        f"from {TOKENS_URL}")
    return token


def push_plan(source, model_tag=None, step=None, with_optimizer=False):
    """
    (files, tag, step) for a push: files is [(local path, path in the repo)], the checkpoint (optimizer shards only
    with_optimizer), the tokenizer it was trained with, and the report card when there is one.
    """
    checkpoint_dir, step = find_checkpoint(source, model_tag, step)
    tag = os.path.basename(checkpoint_dir)
    names = [f"model_{step:06d}.pt", f"meta_{step:06d}.json"]
    if with_optimizer:
        shards = sorted(n for n in os.listdir(checkpoint_dir) if re.fullmatch(rf"optim_{step:06d}_rank\d+\.pt", n))
        if not shards:
            raise UserError(f"--with-optimizer, but {checkpoint_dir} step {step} has no optimizer state "
                            f"(optim_{step:06d}_rank*.pt): drop the flag, or push a step that was saved with it")
        names += shards
    files = [(os.path.join(checkpoint_dir, n), f"{source}/{tag}/{n}") for n in names]
    files += [(os.path.join(tokenizer_dir(), n), f"tokenizer/{n}") for n in TOKENIZER_FILES
              if os.path.exists(os.path.join(tokenizer_dir(), n))]
    report = os.path.join(report_dir(), "report.md")
    if os.path.exists(report):
        files.append((report, "report/report.md"))
    missing = [path for path, _ in files if not os.path.isfile(path)]
    if missing:
        raise UserError(f"{missing[0]} is missing: pick another step with --step, or retrain")
    try:
        with open(os.path.join(checkpoint_dir, names[1])) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{os.path.join(checkpoint_dir, names[1])} cannot be read ({first_line(e)}): pick another "
                        "step with --step") from None
    check_tokenizer(meta, get_tokenizer(), checkpoint_dir)  # the repo must hold the tokenizer its checkpoint needs
    return files, tag, step


def check_repo_tokenizer(repo, entries, files):
    """A push must not swap the repo's tokenizer under its other checkpoints: they would read garbage with the new one."""
    ours = {in_repo: path for path, in_repo in files}
    theirs = entries.get("tokenizer/tokenizer.pkl")
    if not theirs or "tokenizer/tokenizer.pkl" not in ours or same_file(ours["tokenizer/tokenizer.pkl"], theirs):
        return
    others = sorted(f"{m[1]}/{m[2]} step {int(m[3])}" for p in entries if p not in ours and (m := CHECKPOINT_META.fullmatch(p)))
    if others:
        raise UserError(f"{repo}'s tokenizer/tokenizer.pkl is not {ours['tokenizer/tokenizer.pkl']}, and its checkpoints "
                        f"({', '.join(others)}) need theirs: push to another --repo")


def push(repo, files, token, private=False, endpoint=None, message="nanochat checkpoint"):
    """Upload files [(local path, path in the repo)] as one commit, creating the repo if needed. Returns the CommitInfo."""
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(api, repo, writing=True):
        try:  # first, with a timeout: no network is one line now, not a hang later in the upload
            info = api.repo_info(repo, revision="main", timeout=TIMEOUT)  # the form mirrors (olah) answer too
        except RepositoryNotFoundError:
            info = None
        if info is None:  # private=False would make it public even where an org's repos default to private
            api.create_repo(repo, private=True if private else None, exist_ok=True)
        elif private and not info.private:
            raise UserError(f"--private, but {repo} exists and is public: make it private in its settings on "
                            f"{api.endpoint}/{repo}, or drop --private")
        else:
            check_repo_tokenizer(repo, listing(api, repo), files)
        operations = [CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path) for path, in_repo in files]
        return api.create_commit(repo, operations=operations, commit_message=message)


# -----------------------------------------------------------------------------
# Pull

def pick_checkpoint(repo, entries, source, model_tag=None, step=None):
    """(folder in the repo, step): the largest d<N> tag under <source>/ and its last step unless given."""
    metas = [m.groups() for path in entries if (m := CHECKPOINT_META.fullmatch(path))]
    held = (", ".join(sorted({f"{s}/{t}" for s, t, _ in metas}))
            or f"no checkpoints, only: {', '.join(sorted(entries)[:8]) or 'nothing'}")
    tags = sorted({t for s, t, _ in metas if s == source})
    if not tags:
        raise UserError(f"{repo} has no {source} checkpoint (it holds {held}): pick --source from what it holds")
    if model_tag is None:
        model_tag = largest_tag(tags)
    elif model_tag not in tags:
        raise UserError(f"{repo} has no {source}/{model_tag} (it holds {held}): pick --model-tag from those")
    steps = sorted(int(n) for s, t, n in metas if (s, t) == (source, model_tag))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{repo} has no step {step} of {source}/{model_tag} (it holds {', '.join(map(str, steps))}): "
                        "pick --step from those")
    return f"{source}/{model_tag}", step


def settle_tokenizer(repo, meta, pulled_dir, replace):
    """
    (what the pull does with the tokenizer, the local one's fingerprint): 'kept' (the one here is the checkpoint's),
    'installed' (none was here) or 'replaced' (only with replace). A tokenizer here that the checkpoint was not trained
    with is never overwritten without it: the checkpoints trained with it would read garbage.
    """
    fingerprint = lambda folder: RustBPETokenizer.from_directory(folder).fingerprint()
    local = fingerprint(tokenizer_dir()) if os.path.exists(os.path.join(tokenizer_dir(), "tokenizer.pkl")) else None
    try:
        pulled = fingerprint(pulled_dir) if pulled_dir else None
    except UserError:  # its message tells how to mend a tokenizer trained here
        raise UserError(f"{repo}'s tokenizer/tokenizer.pkl is no tokenizer this code can read: push the checkpoint "
                        "again, with its tokenizer") from None
    wanted = meta.get("tokenizer") or pulled  # checkpoints from before fingerprints carry none
    if pulled and pulled != wanted:
        raise UserError(f"{repo} does not hold together: its checkpoint was trained with tokenizer {wanted}, its "
                        f"tokenizer/ is {pulled}: push the checkpoint again, with its tokenizer")
    if local is not None and wanted in (None, local):
        return "kept", local
    if pulled is None:
        raise UserError(f"{repo} has no tokenizer/ and {tokenizer_dir()} does not hold the one its checkpoint was "
                        f"trained with ({wanted}): push the checkpoint again, with its tokenizer")
    if local is None:
        return "installed", local
    if not replace:
        raise UserError(f"{repo}'s checkpoint was trained with tokenizer {pulled}, but {tokenizer_dir()} holds another "
                        f"({local}), which the checkpoints here may need: pass --replace-tokenizer to use the pulled one "
                        f"(yours is kept in {tokenizer_dir()}-{local}), or pull into another NANOCHAT_BASE_DIR")
    return "replaced", local


def pull_plan(repo, entries, source, model_tag=None, step=None, with_optimizer=False):
    """
    (files, checkpoint_dir, step) for a pull: files is {path in the repo: local path} in landing order, the tokenizer
    and report card first, the checkpoint's meta last (a checkpoint exists once its meta does).
    """
    folder, step = pick_checkpoint(repo, entries, source, model_tag, step)
    names = [f"model_{step:06d}.pt", f"meta_{step:06d}.json"]
    if with_optimizer:
        shards = sorted(p.rpartition("/")[2] for p in entries if re.fullmatch(rf"{folder}/optim_{step:06d}_rank\d+\.pt", p))
        if not shards:
            raise UserError(f"--with-optimizer, but {repo} has no optimizer state for {folder} step {step}: drop the "
                            "flag (the model alone chats and evaluates), or push it again --with-optimizer")
        names = shards + names
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[source], folder.rpartition("/")[2])
    files = {f"tokenizer/{n}": os.path.join(tokenizer_dir(), n) for n in TOKENIZER_FILES if f"tokenizer/{n}" in entries}
    if "report/report.md" in entries:
        files["report/report.md"] = os.path.join(checkpoint_dir, "report.md")
    files.update({f"{folder}/{n}": os.path.join(checkpoint_dir, n) for n in names})
    missing = [p for p in files if p not in entries]
    if missing:
        raise UserError(f"{repo} has {folder}/meta_{step:06d}.json but not {missing[0]}: push that checkpoint again")
    return files, checkpoint_dir, step


def download(api, repo, commit, entries, paths, staging):
    """Download paths of the repo at commit into staging (resuming what an earlier try left there), and check each."""
    if not paths:
        return
    with hub_errors(api, repo):
        snapshot_download(repo, revision=commit, local_dir=staging, allow_patterns=paths, endpoint=api.endpoint,
                          etag_timeout=TIMEOUT)
    for p in paths:
        path, entry = os.path.join(staging, p), entries[p]
        if not same_file(path, entry):
            got = os.path.getsize(path) if os.path.exists(path) else 0
            if os.path.exists(path):
                os.remove(path)
            raise UserError(f"{p} arrived as {got:,} bytes{' with another hash' if got == entry.size else ''}, but "
                            f"{repo} lists {entry.size:,}: the download was damaged; run the pull again")


def read_meta(repo, path, in_repo):
    try:
        with open(path, "rb") as f:
            meta = json.load(f)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{repo}'s {in_repo} is no checkpoint's meta: push that checkpoint again")
    return meta


def pull(repo, source="sft", model_tag=None, step=None, with_optimizer=False, replace_tokenizer=False, overwrite=False,
         endpoint=None):
    """
    Download a checkpoint, its tokenizer and report card from repo to where load_model finds them. Files already
    here and the same are not downloaded again; the rest go to a folder under $NANOCHAT_BASE_DIR first (a broken-off
    pull resumes there), are checked, then moved into place. A checkpoint file here that differs from the repo's is
    replaced only with overwrite. Returns what was pulled, for the result line.
    """
    api = HfApi(endpoint=endpoint)
    with hub_errors(api, repo):
        commit = api.repo_info(repo, revision="main", timeout=TIMEOUT).sha  # mirrors such as olah answer only this form
    entries = listing(api, repo, commit)
    files, checkpoint_dir, step = pull_plan(repo, entries, source, model_tag, step, with_optimizer)
    needed = [p for p, dest in files.items() if not same_file(dest, entries[p])]
    clashes = [files[p] for p in needed if p.startswith(f"{source}/") and os.path.exists(files[p])]
    if clashes and not overwrite:
        raise UserError(f"{clashes[0]}{f' (and {len(clashes) - 1} more)' if len(clashes) > 1 else ''} differs from "
                        f"{repo}'s: pass --overwrite to replace it with the repo's, or pull into another NANOCHAT_BASE_DIR")
    size = sum(entries[p].size for p in needed)
    print(f"pulling {source}/{os.path.basename(checkpoint_dir)} step {step} of {repo} from {api.endpoint} (commit "
          f"{commit[:12]}): {len(needed)} of {len(files)} files to download, {size:,} bytes", flush=True)
    staging = os.path.join(get_base_dir(), f"hub_pull-{repo.replace('/', '--')}")
    pulled = lambda p: os.path.join(staging, p) if p in needed else files[p]  # where p's pulled copy is now

    meta_in_repo = list(files)[-1]  # the tokenizer and meta first: a tokenizer that cannot be used stops the pull here
    first = [p for p in needed if p.startswith("tokenizer/") or p == meta_in_repo]
    download(api, repo, commit, entries, first, staging)
    meta = read_meta(repo, pulled(meta_in_repo), meta_in_repo)
    pulled_tokenizer = os.path.dirname(pulled("tokenizer/tokenizer.pkl")) if "tokenizer/tokenizer.pkl" in files else None
    tokenizer, local = settle_tokenizer(repo, meta, pulled_tokenizer, replace_tokenizer)
    download(api, repo, commit, entries, [p for p in needed if p not in first], staging)
    if tokenizer == "replaced":  # keep the old one aside, and drop what the pulled one does not come with
        shutil.copytree(tokenizer_dir(), f"{tokenizer_dir()}-{local}", dirs_exist_ok=True)
        for n in TOKENIZER_FILES:
            if f"tokenizer/{n}" not in files and os.path.exists(os.path.join(tokenizer_dir(), n)):
                os.remove(os.path.join(tokenizer_dir(), n))
    landed = {p: dest for p, dest in files.items()  # a kept tokenizer still gains the files it lacks (token_bytes.pt)
              if tokenizer != "kept" or not p.startswith("tokenizer/") or not os.path.exists(dest)}
    for p, dest in landed.items():
        if p in needed:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(os.path.join(staging, p), dest)
    shutil.rmtree(staging, ignore_errors=True)
    later = [s for s in checkpoint_steps(checkpoint_dir) if s > step]
    if later:
        print(f"note: {checkpoint_dir} also holds step {later[-1]}, later than the pulled {step}: chat_web and the "
              f"evals take the last step unless given -s/--step {step}", flush=True)
    return {"repo": repo, "endpoint": api.endpoint, "commit": commit, "source": source,
            "model_tag": os.path.basename(checkpoint_dir), "step": step, "checkpoint_dir": checkpoint_dir,
            "tokenizer": tokenizer, "files": landed, "downloaded": needed, "bytes": size}
