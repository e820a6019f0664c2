"""Prepare the training data of the demo model (issue 8).

Source: the Python 3.11 documentation as packaged by Debian (`python3.11-doc`,
HTML under /usr/share/doc/python3.11/html), licensed under the PSF License
Agreement (see /usr/share/doc/python3.11-doc/copyright and html/license.html),
which permits reproducing it and distributing derivative works.

Steps: extract the main text of every HTML page (stdlib html.parser; the Sphinx
navigation, sidebars, headers and footers are dropped, code blocks are kept),
normalise whitespace, shuffle the documents with a fixed seed, hold out a slice
for evaluation, train a SentencePiece tokenizer (Gemma's id conventions) on the
training text, and tokenize both splits to uint16 arrays.

    apt-get install -y python3.11-doc
    python examples/train_demo/prepare_data.py --out data/demo

Writes (data/ is in .gitignore):
    OUT/train.txt, OUT/heldout.txt          documents separated by a blank line
    OUT/tokens/tokenizer.model              SentencePiece, vocab 4096, byte fallback
    OUT/tokens/train.npy, heldout.npy       uint16 token ids; each document is BOS + text + EOS
    OUT/tokens/meta.json                    counts and provenance
    SAMPLE (default tests/data/demo_heldout/sample.txt)
                                            ~40 KB of held-out documents, committed: the
                                            demo model's loss test reads it
`OUT/tokens` is all that training needs (a few MB): carry it to the GPU machine.
"""

from __future__ import annotations

import argparse
import html.parser
import io
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np

DOC_ROOT = Path("/usr/share/doc/python3.11/html")
LICENSE_FILES = (Path("/usr/share/doc/python3.11-doc/copyright"),)
SKIP_TAGS = {"script", "style", "nav", "head", "title"}
# Sphinx chrome inside the page: permalinks, navigation bars, sidebars, footers.
SKIP_CLASSES = {"headerlink", "related", "sphinxsidebar", "footer", "mobile-nav", "menu-wrapper",
                "nav-content", "clearer", "sphinxsidebarwrapper"}
BLOCK_TAGS = {"p", "div", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br",
              "section", "table", "blockquote", "ul", "ol", "dl", "figure", "caption"}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class _TextExtractor(html.parser.HTMLParser):
    """Text inside the Sphinx main body (div role="main"), chrome dropped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out = io.StringIO()
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipping, in_main)
        self.pre = 0

    def _state(self):
        return self.stack[-1][1:] if self.stack else (False, False)

    def handle_starttag(self, tag, attrs):
        skipping, in_main = self._state()
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if attrs.get("role") == "main" or "body" in classes and tag == "div":
            in_main = True
        if tag in SKIP_TAGS or classes & SKIP_CLASSES or attrs.get("role") == "navigation":
            skipping = True
        if tag in BLOCK_TAGS:
            self.out.write("\n")
        if tag == "pre":
            self.pre += 1
        if tag not in VOID_TAGS:
            self.stack.append((tag, skipping, in_main))

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        # Pop to the matching tag (HTML in the wild is not always balanced).
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCK_TAGS:
            self.out.write("\n")

    def handle_data(self, data):
        skipping, in_main = self._state()
        if skipping or not in_main:
            return
        if self.pre:
            self.out.write(data)
        else:
            self.out.write(re.sub(r"\s+", " ", data))


def extract(html_text: str) -> str:
    parser = _TextExtractor()
    parser.feed(html_text)
    parser.close()
    text = parser.out.getvalue().replace("\u00b6", "")  # pilcrow permalinks
    lines = [line.rstrip() for line in text.split("\n")]
    # Normalise whitespace: strip line ends, collapse runs of blank lines to one.
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text


def documents(root: Path) -> list[tuple[str, str]]:
    docs = []
    for path in sorted(root.rglob("*.html")):
        rel = str(path.relative_to(root))
        if rel.startswith(("_static", "_sources", "_images", "_downloads")) or rel in ("genindex.html", "search.html") \
                or rel.startswith("genindex") or rel == "py-modindex.html":
            continue
        text = extract(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 200:
            docs.append((rel, text))
    return docs


def train_tokenizer(train_txt: Path, prefix: Path, vocab_size: int, seed: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(train_txt), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=False,  # as Gemma
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        input_sentence_size=0, shuffle_input_sentence=False,  # every line, deterministic
        max_sentence_length=16384, num_threads=8, minloglevel=2)


def tokenize(sp, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for doc in docs:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(doc))
        ids.append(sp.eos_id())
    arr = np.asarray(ids, dtype=np.int64)
    assert arr.max() < 2**16
    return arr.astype(np.uint16)


def heldout_sample(held: list[str], limit: int) -> list[str]:
    """Whole paragraphs from the first held-out documents, up to `limit` bytes."""
    out, size = [], 0
    for doc in held:
        paras = []
        for para in doc.split("\n\n"):
            n = len(para.encode()) + 2
            if size + n > limit:
                break
            paras.append(para)
            size += n
        if paras:
            out.append("\n\n".join(paras))
        if size + 200 > limit:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DOC_ROOT, help=f"HTML root (default {DOC_ROOT})")
    ap.add_argument("--out", type=Path, default=Path("data/demo"))
    ap.add_argument("--heldout", type=float, default=0.02, help="fraction of documents held out (default 0.02)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=Path, default=Path("tests/data/demo_heldout/sample.txt"),
                    help="where to write the committed held-out sample")
    ap.add_argument("--sample-bytes", type=int, default=40_000)
    args = ap.parse_args()

    if not args.source.is_dir():
        raise SystemExit(f"{args.source} not found: apt-get install -y python3.11-doc")
    docs = documents(args.source)
    random.Random(args.seed).shuffle(docs)
    n_held = max(1, round(len(docs) * args.heldout))
    held, train = docs[:n_held], docs[n_held:]
    out = args.out
    tok_dir = out / "tokens"
    tok_dir.mkdir(parents=True, exist_ok=True)
    # Documents never contain a run of 3 newlines (normalised away) so "\n\n\n" separates them.
    (out / "train.txt").write_text("\n\n\n".join(t for _, t in train) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text("\n\n\n".join(t for _, t in held) + "\n", encoding="utf-8")
    args.sample.parent.mkdir(parents=True, exist_ok=True)
    args.sample.write_text("\n\n\n".join(heldout_sample([t for _, t in held], args.sample_bytes)) + "\n",
                           encoding="utf-8")
    for f in LICENSE_FILES:
        if f.exists():
            shutil.copy(f, out / "SOURCE-COPYRIGHT.txt")
    train_tokenizer(out / "train.txt", tok_dir / "tokenizer", args.vocab_size, args.seed)
    (tok_dir / "tokenizer.vocab").unlink(missing_ok=True)

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    train_ids = tokenize(sp, [t for _, t in train])
    held_ids = tokenize(sp, [t for _, t in held])
    np.save(tok_dir / "train.npy", train_ids)
    np.save(tok_dir / "heldout.npy", held_ids)
    meta = {
        "source": f"{args.source} (Debian package python3.11-doc)",
        "license": "PSF License Agreement (Python documentation); see SOURCE-COPYRIGHT.txt",
        "seed": args.seed, "heldout_fraction": args.heldout,
        "documents": {"train": len(train), "heldout": len(held)},
        "heldout_documents": [name for name, _ in held],
        "characters": {"train": sum(len(t) for _, t in train), "heldout": sum(len(t) for _, t in held)},
        "tokens": {"train": int(train_ids.size), "heldout": int(held_ids.size)},
        "vocab_size": sp.get_piece_size(),
    }
    (tok_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: v for k, v in meta.items() if k != "heldout_documents"}, indent=1))


if __name__ == "__main__":
    main()
