"""
Push a trained model to the Hugging Face Hub, or pull one from it to serve, evaluate or keep training.

    python -m scripts.hub push --repo USER/NAME          # the largest sft model's last step, its tokenizer and report card
    python -m scripts.hub push --repo USER/NAME -i base -g d20 -s 5000 --with-optimizer --private
    python -m scripts.hub pull --repo USER/NAME          # then: python -m scripts.chat_web
    python -m scripts.hub pull --repo USER/NAME -i base --with-optimizer   # to resume training it

A push needs a write token (`hf auth login`, or HF_TOKEN). HF_ENDPOINT or --endpoint points at a mirror.
The repo's layout and where a pull lands: nanochat/hub.py.
"""

import os
import time

from nanochat.checkpoint_manager import SOURCES
from nanochat.common import Flags, check_folder_name, check_minimums, print_result, run_cli
from nanochat.hub import check_endpoint, check_repo_id, pull, push, push_plan, push_token


def main(argv=None):
    parser = Flags(description="Push a model to the Hugging Face Hub, or pull one from it.")
    actions = parser.add_subparsers(dest="action", required=True)
    push_flags = actions.add_parser("push", help="upload a checkpoint, its tokenizer and report card as one commit")
    pull_flags = actions.add_parser("pull", help="download a checkpoint and its tokenizer to where load_model finds them")
    for p in (push_flags, pull_flags):
        p.add_argument("--repo", required=True, help="the Hub model repo, USER/NAME")
        p.add_argument("-i", "--source", default="sft", choices=list(SOURCES), help="which stage's checkpoint")
        p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest d<N>)")
        p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
        p.add_argument("--with-optimizer", action="store_true", help="the optimizer shards too, to resume training")
        p.add_argument("--endpoint", default=None, help="the Hub's URL (default: $HF_ENDPOINT, else huggingface.co)")
    push_flags.add_argument("--private", action="store_true", help="create the repo private (default: the account's "
                            "or org's default visibility)")
    pull_flags.add_argument("--replace-tokenizer", action="store_true", help="replace a different tokenizer in "
                            "$NANOCHAT_BASE_DIR/tokenizer (it is kept aside) with the one the pulled model needs")
    pull_flags.add_argument("--overwrite", action="store_true", help="replace checkpoint files here that differ from "
                            "the repo's (default: refuse)")
    args = parser.parse_args(argv)
    check_repo_id(args.repo)
    check_folder_name("--model-tag", args.model_tag)
    check_minimums(args, {"--step": 0})
    endpoint = check_endpoint(args.endpoint)

    t0 = time.time()
    if args.action == "push":
        token = push_token()
        files, tag, step = push_plan(args.source, args.model_tag, args.step, args.with_optimizer)
        size = sum(os.path.getsize(path) for path, _ in files)
        print(f"pushing {args.source}/{tag} step {step} to {args.repo}: {len(files)} files, {size:,} bytes", flush=True)
        commit = push(args.repo, files, token, args.private, endpoint,
                      message=f"nanochat {args.source}/{tag} step {step}")
        print(f"pushed: {commit.commit_url}", flush=True)
        print_result("hub", action="push", repo=args.repo, commit=commit.oid, url=commit.commit_url, source=args.source,
                     model_tag=tag, step=step, private=args.private, files={in_repo: path for path, in_repo in files},
                     bytes=size, seconds=round(time.time() - t0, 2))
    else:
        pulled = pull(args.repo, args.source, args.model_tag, args.step, args.with_optimizer, args.replace_tokenizer,
                      args.overwrite, endpoint)
        print(f"pulled into {pulled['checkpoint_dir']} (tokenizer {pulled['tokenizer']}): serve it with "
              f"python -m scripts.chat_web -i {args.source} -g {pulled['model_tag']}", flush=True)
        print_result("hub", action="pull", **pulled, seconds=round(time.time() - t0, 2))


if __name__ == "__main__":
    run_cli(main)
