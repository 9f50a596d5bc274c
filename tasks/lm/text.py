"""Byte-level text for language-model meta-learning, through Grain.

Tokens are the UTF-8 bytes of the text (`VOCAB_SIZE` = 256; no vocabulary
file, no download). A `TextCorpus` is one or more text files, memory-mapped
lazily in each process (a pickled corpus, as Grain worker processes receive
it, holds only paths and sizes), or by default the embedded text of Python's
documentation topics (`embedded_text`, ``pydoc_data.topics``, about 466 KB,
shipped with every CPython). The path `SYNTHETIC` (``"synthetic"``) is random
bytes for benchmarks at lengths the embedded text is too short for.

Each document (a file, or the whole embedded text) is cut into consecutive,
non-overlapping sequences of ``seq_len + 1`` bytes (inputs plus next-byte
targets; the remainder is dropped, and no sequence crosses a document
boundary). The sequences of each document are split in order into contiguous
parts (`PART_FRACTIONS`), so no text is shared between parts:

* ``"train"``: the inner-loop training text x_t (first 80%);
* ``"outer"``: the outer (validation) text x_val of meta-training (next 10%);
* ``"validation"``: held-out outer text for meta-validation (next 5%);
* ``"test"``: held-out outer text for meta-testing (last 5%).

`batches` is an infinite, random-access stream of batches of one part: each
epoch visits the part's sequences once in a seeded shuffled order, and every
epoch has a new order. `lm_episodes` combines the streams into the episodes
of the meta-learner: T inner batches from ``"train"`` and one outer batch from
the part that `OUTER_PARTS` names for the split. Item ``k`` of a stream or of
an episode dataset depends only on its arguments and ``k``, so the position
of a Grain iterator is all that resuming needs.
"""

from __future__ import annotations

import codecs
import dataclasses
import fractions
import functools
import os
import sys
import warnings
from typing import Optional, Sequence, Union

import grain
import numpy as np

from metaflow import data
from metaflow._checks import check_int

#: Byte-level tokens: every byte value is a token.
VOCAB_SIZE = 256

#: The parts of each document's sequences, in document order, and their
#: fractions of its sequences.
PART_FRACTIONS = {"train": 0.8, "outer": 0.1, "validation": 0.05, "test": 0.05}

#: Part names, in document order.
PARTS = tuple(PART_FRACTIONS)

#: The part that gives the outer batches of each split of `metaflow.data`.
OUTER_PARTS = {"train": "outer", "validation": "validation", "test": "test"}

#: The same for a separate target text (`lm_episodes`' ``outer_corpus``):
#: no inner batch comes from it, so meta-training's outer batches take its
#: first 80% (its ``"train"`` part), 8 times the text of its ``"outer"``
#: part; its held-out parts stay held out.
TARGET_PARTS = {"train": "train", "validation": "validation", "test": "test"}

#: Name of the embedded corpus in messages.
EMBEDDED_NAME = "embedded corpus (pydoc_data.topics)"

#: A path that names no file but uniform random bytes, generated (seed 0),
#: enough for 20 sequences of any length: for measuring memory and speed at
#: lengths no bundled text covers (the figures do not depend on the bytes;
#: there is nothing to learn in them). ``./synthetic`` names a file.
SYNTHETIC = "synthetic"
_SYNTHETIC_SEQUENCES = 20

_CHUNK_BYTES = 1 << 20

# Cumulative fractions (exact rationals): part j of a document of n sequences
# is sequences [floor(n * _CUTS[j]), floor(n * _CUTS[j + 1])).
_CUTS = [fractions.Fraction(0)]
for _fraction in PART_FRACTIONS.values():
  _CUTS.append(_CUTS[-1] + fractions.Fraction(repr(_fraction)))
assert _CUTS[-1] == 1, "PART_FRACTIONS must sum to 1."
del _fraction


# ---------------------------------------------------------------- tokens
def encode(text: Union[str, bytes]) -> np.ndarray:
  """Tokens ``uint8 [N]`` of ``text``: its UTF-8 bytes (bytes as they are)."""
  if isinstance(text, str):
    text = text.encode("utf-8")
  return np.frombuffer(bytes(text), dtype=np.uint8).copy()


def decode(tokens) -> str:
  """The text of byte tokens ``[..., N]`` (flattened); UTF-8 with invalid
  bytes replaced by U+FFFD.

  Raises:
    ValueError: a token outside [0, 256).
  """
  tokens = np.asarray(tokens)
  if tokens.dtype != np.uint8:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
      raise ValueError(f"byte tokens must be in [0, {VOCAB_SIZE}), got values "
                       f"in [{tokens.min()}, {tokens.max()}].")
    tokens = tokens.astype(np.uint8)
  return tokens.tobytes().decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def embedded_text() -> bytes:
  """The default corpus: Python's documentation topics (``pydoc_data``),
  in sorted topic order with a blank line between topics, UTF-8 encoded.

  Built once per process (about 466 KB).
  """
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "The embedded text corpus needs pydoc_data.topics, which this Python "
        "installation lacks; give text file paths instead.") from None
  texts = topics.topics
  return "\n".join(texts[key].rstrip("\n") + "\n"
                   for key in sorted(texts)).encode("utf-8")


def first_invalid_utf8(path: str, chunk_bytes: int = _CHUNK_BYTES
                       ) -> Optional[int]:
  """Offset of the first byte of ``path`` that is not valid UTF-8, or None.

  Reads the file in chunks of ``chunk_bytes`` through an incremental decoder,
  so a large file is never held whole. A multi-byte character cut off at the
  end of the file counts as invalid at its first byte.
  """
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset = 0
  with open(path, "rb") as f:
    while True:
      chunk = f.read(chunk_bytes)
      pending = len(decoder.getstate()[0])  # Bytes held from earlier chunks.
      try:
        decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as e:
        return offset - pending + e.start
      if not chunk:
        return None
      offset += len(chunk)


def _part_cuts(num_sequences: int) -> list[int]:
  """Part boundaries ``[0, ..., num_sequences]`` of one document's sequences."""
  return [num_sequences * c.numerator // c.denominator for c in _CUTS]


def _min_document_sequences() -> int:
  """The fewest sequences with which one document fills every part."""
  n = 1
  while min(np.diff(_part_cuts(n))) < 1:
    n += 1
  return n


def check_part(part: str) -> int:
  """Index of ``part`` in `PARTS`; ValueError for an unknown part."""
  if part not in PARTS:
    raise ValueError(f"Unknown text part {part!r}; expected one of {PARTS}.")
  return PARTS.index(part)


# ---------------------------------------------------------------- corpus
class TextCorpus:
  """Text files (or the embedded corpus) cut into sequences and parts.

  The files are checked when the corpus is built (in the main process, before
  any compilation) and memory-mapped lazily when first read in each process;
  pickling keeps only the paths, sizes and part tables.

  Args:
    paths: text files, each one document; empty for the embedded corpus
      (`embedded_text`). A single path may be given as a string.
    seq_len: L; a sequence is ``L + 1`` bytes (L inputs, L next-byte targets).
    strict_utf8: refuse files that are not valid UTF-8. By default such a
      file is used as raw bytes (byte-level tokens need no decoding), with a
      warning.

  Raises:
    FileNotFoundError: a path does not exist or is a directory.
    ValueError: ``seq_len < 1``; a file is empty, shorter than one sequence,
      given twice, or (with ``strict_utf8``) not UTF-8; or a part of the
      corpus would be empty.
  """

  def __init__(self, paths: Union[str, os.PathLike, Sequence[str]] = (),
               seq_len: int = 128, strict_utf8: bool = False):
    self.seq_len = check_int("seq_len", seq_len, 1)
    self.strict_utf8 = bool(strict_utf8)
    if isinstance(paths, (str, os.PathLike)):
      paths = (paths,)
    self.paths: tuple[Optional[str], ...] = (
        tuple(os.path.expanduser(os.fspath(p)) for p in paths) or (None,))
    self.sizes = tuple(self._check_document(p) for p in self.paths)
    self._check_duplicates()
    # Per part: the documents it reads, the first sequence in each, and the
    # cumulative number of its sequences (offsets[0] == 0).
    width = self.seq_len + 1
    tables = {part: ([], [], [0]) for part in PARTS}
    for doc, size in enumerate(self.sizes):
      cuts = _part_cuts(size // width)
      for j, part in enumerate(PARTS):
        if cuts[j + 1] > cuts[j]:
          docs, starts, offsets = tables[part]
          docs.append(doc)
          starts.append(cuts[j])
          offsets.append(offsets[-1] + cuts[j + 1] - cuts[j])
    self._tables = {part: tuple(np.asarray(t, np.int64) for t in table)
                    for part, table in tables.items()}
    counts = {part: self.num_sequences(part) for part in PARTS}
    if min(counts.values()) < 1:
      n = _min_document_sequences()
      raise ValueError(
          f"text corpus {self._describe()} gives {sum(counts.values())} "
          f"sequences of seq_len + 1 = {width} bytes ("
          + ", ".join(f"{p} {c}" for p, c in counts.items())
          + "); every part needs at least one (each document's sequences are "
          "split " + "/".join(f"{100 * f:g}" for f in PART_FRACTIONS.values())
          + f"%): use more text (one document needs at least {n} sequences, "
          f"{n * width} bytes) or a shorter seq_len.")
    self._arrays: dict[int, np.ndarray] = {}

  # ------------------------------------------------------------- checks
  def _name(self, doc: int) -> str:
    path = self.paths[doc]
    if path == SYNTHETIC:
      return "synthetic random bytes"
    return EMBEDDED_NAME if path is None else f"text file {path!r}"

  def _describe(self) -> str:
    names = ["embedded" if p is None else repr(p) for p in self.paths]
    if len(names) > 3:
      names = names[:3] + [f"... ({len(names)} files)"]
    return "(" + ", ".join(names) + ")"

  def _check_document(self, path: Optional[str]) -> int:
    """Checks one document; returns its size in bytes."""
    width = self.seq_len + 1
    if path == SYNTHETIC:
      return max(_SYNTHETIC_SEQUENCES * width, _CHUNK_BYTES)
    if path is None:
      size = len(embedded_text())
      if size < width:
        raise ValueError(f"{EMBEDDED_NAME} has {size} bytes, fewer than one "
                         f"sequence of seq_len + 1 = {width} bytes; use a "
                         "shorter seq_len.")
      return size
    name = f"text file {path!r}"
    if os.path.isdir(path):
      raise FileNotFoundError(f"{name} is a directory, not a file; name the "
                              "text files in it.")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{name} does not exist (or is not a file).")
    size = os.path.getsize(path)
    if size == 0:
      raise ValueError(f"{name} is empty.")
    if size < width:
      hint = (f"use seq_len <= {size - 1} or a longer file" if size > 1
              else "use a longer file")
      raise ValueError(f"{name} has {size} bytes, fewer than one sequence of "
                       f"seq_len + 1 = {width} bytes; {hint}.")
    offset = first_invalid_utf8(path)
    if offset is not None:
      if self.strict_utf8:
        raise ValueError(f"{name} is not valid UTF-8 (first invalid byte at "
                         f"offset {offset}) and strict_utf8 is set.")
      warnings.warn(f"{name} is not valid UTF-8 (first invalid byte at offset "
                    f"{offset}); its bytes are used as they are (byte-level "
                    "tokens need no decoding).", UnicodeWarning, stacklevel=4)
    return size

  def _check_duplicates(self):
    seen = {}
    for path in self.paths:
      if path is None or path == SYNTHETIC:
        continue
      key = os.path.realpath(path)
      if key in seen:
        raise ValueError(f"text file {path!r} is given twice (as "
                         f"{seen[key]!r}); its parts would share text.")
      seen[key] = path

  # ------------------------------------------------------------- access
  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    state["_arrays"] = {}  # Memory maps are reopened in the new process.
    return state

  def __repr__(self) -> str:
    return (f"TextCorpus({self._describe()}, seq_len={self.seq_len}, "
            + ", ".join(f"{p}={self.num_sequences(p)}" for p in PARTS) + ")")

  def tokens(self, doc: int) -> np.ndarray:
    """All bytes ``uint8 [size]`` of document ``doc`` (a read-only memory map,
    or the embedded text), opened once per process."""
    array = self._arrays.get(doc)
    if array is None:
      path = self.paths[doc]
      if path is None:
        array = np.frombuffer(embedded_text(), dtype=np.uint8)
      elif path == SYNTHETIC:
        array = np.random.default_rng(0).integers(
            0, VOCAB_SIZE, self.sizes[doc], dtype=np.uint8)
      else:
        array = np.memmap(path, dtype=np.uint8, mode="r")
      if array.shape[0] != self.sizes[doc]:
        raise ValueError(f"{self._name(doc)} has changed since the corpus was "
                         f"built ({array.shape[0]} bytes, was "
                         f"{self.sizes[doc]}).")
      self._arrays[doc] = array
    return array

  def num_sequences(self, part: Optional[str] = None) -> int:
    """Sequences in ``part`` (one of `PARTS`), or in all parts if None."""
    if part is None:
      return sum(self.num_sequences(p) for p in PARTS)
    return int(self._tables[PARTS[check_part(part)]][2][-1])

  def sequence(self, part: str, index: int) -> np.ndarray:
    """Sequence ``index`` of ``part``: ``uint8 [seq_len + 1]`` (a copy)."""
    docs, starts, offsets = self._tables[PARTS[check_part(part)]]
    total = int(offsets[-1])
    index = int(index)
    if not -total <= index < total:
      raise IndexError(f"sequence {index} of part {part!r} is out of range "
                       f"(it has {total}).")
    index %= total
    j = int(np.searchsorted(offsets, index, side="right")) - 1
    k = int(starts[j]) + index - int(offsets[j])
    width = self.seq_len + 1
    return np.array(self.tokens(int(docs[j]))[k * width:(k + 1) * width])

  def part(self, part: str) -> TextPart:
    """The random-access data source of ``part``'s sequences."""
    check_part(part)
    return TextPart(self, part)


@dataclasses.dataclass(frozen=True, eq=False)
class TextPart:
  """A Grain random-access data source: the sequences of one part of a corpus
  in document order; item ``i`` is ``uint8 [seq_len + 1]``."""
  corpus: TextCorpus
  name: str

  def __len__(self) -> int:
    return self.corpus.num_sequences(self.name)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.corpus.sequence(self.name, index)

  def __repr__(self) -> str:
    return f"TextPart({self.name!r}, {self.corpus!r})"


# --------------------------------------------------------------- streams
def _shuffle_seed(seed: int, split: str, part: str) -> int:
  """A 32-bit shuffle seed for the stream of ``(seed, split, part)``."""
  entropy = [check_int("seed", seed, 0), data.check_split(split),
             check_part(part)]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclasses.dataclass(frozen=True, eq=False)
class _Batch:
  """``k -> uint8 [batch_size, seq_len + 1]``: sequences ``k * batch_size ...``
  of the endless shuffled epochs of a part (picklable, also after use)."""
  corpus: TextCorpus
  part: str
  batch_size: int
  shuffle_seed: int

  @functools.cached_property
  def _sequences(self) -> grain.MapDataset:
    # shuffle(seed).repeat(): grain permutes epoch e with seed + e, so every
    # epoch is a new permutation (repeat().shuffle() would shuffle the whole
    # infinite index range, mixing epochs and repeating sequences within one).
    # Seeds from SeedSequence keep one stream's seed + e from meeting another
    # stream's seed. (grain's index_shuffle costs about 30 ms / n per index
    # for a part of n sequences: negligible from a few thousand sequences.)
    return (grain.MapDataset.source(self.corpus.part(self.part))
            .shuffle(self.shuffle_seed).repeat())

  def __getstate__(self) -> dict:
    # Built again in each process: a grain dataset that has been read from
    # may hold unpicklable caches.
    return {k: v for k, v in self.__dict__.items() if k != "_sequences"}

  def __setstate__(self, state: dict):
    self.__dict__.update(state)

  def __call__(self, index: int) -> np.ndarray:
    return self.rows(index, range(self.batch_size))

  def rows(self, index: int, rows) -> np.ndarray:
    """Rows ``rows`` (positions within the batch) of batch ``index``:
    ``uint8 [len(rows), seq_len + 1]``; only those sequences are read."""
    start = int(index) * self.batch_size
    sequences = self._sequences
    return np.stack([sequences[start + r] for r in rows])


def _stream(corpus: TextCorpus, part: str, batch_size: int, seed: int,
            split: str) -> _Batch:
  return _Batch(corpus, part, batch_size, _shuffle_seed(seed, split, part))


def batches(corpus: TextCorpus, part: str, batch_size: int, seed: int,
            split: str = "train") -> grain.MapDataset:
  """An infinite random-access stream of batches of ``part``'s sequences.

  Item ``k`` is ``uint8 [batch_size, seq_len + 1]``: sequences
  ``k * batch_size ...`` of an endless sequence of epochs, each epoch a seeded
  shuffle of the part (every sequence once), reshuffled every epoch. A batch
  may span two epochs.

  Args:
    corpus: the text.
    part: one of `PARTS`.
    batch_size: B.
    seed: the data seed (>= 0).
    split: the split of `metaflow.data.SPLITS` the stream serves; the shuffle
      order depends on ``(seed, split, part)``, so the streams of different
      seeds, splits and parts are independent.

  Returns:
    A picklable dataset of ``sys.maxsize // batch_size`` batches.
  """
  batch_size = check_int("batch_size", batch_size, 1)
  return grain.MapDataset.range(sys.maxsize // batch_size).map(
      _stream(corpus, part, batch_size, seed, split))


@dataclasses.dataclass(frozen=True, eq=False)
class _Episode:
  """``i -> {"inner": [T, B, L+1], "outer": [B, L+1]}`` (picklable); with
  ``rows``, only those rows of every batch (``[T, R, L+1]``, ``[R, L+1]``)."""
  inner: _Batch  # Batch i: inner batches T*i .. T*i+T-1 of B, concatenated.
  outer: _Batch
  num_inner_steps: int
  rows: tuple[int, ...]

  def __call__(self, index: int) -> dict:
    batch_size = self.outer.batch_size
    inner = self.inner.rows(index, [t * batch_size + r
                                    for t in range(self.num_inner_steps)
                                    for r in self.rows])
    return {"inner": inner.reshape(self.num_inner_steps, -1, inner.shape[-1]),
            "outer": self.outer.rows(index, self.rows)}


def lm_episodes(corpus: TextCorpus, split: str, seed: int,
                num_inner_steps: int, batch_size: int,
                rows: Optional[Sequence[tuple[int, int]]] = None,
                outer_corpus: Optional[TextCorpus] = None
                ) -> grain.MapDataset:
  """Deterministic episodes of the meta-learner for ``split``.

  Item ``i`` is ``{"inner": uint8 [T, B, L+1], "outer": uint8 [B, L+1]}``:
  ``"inner"`` holds items ``T*i .. T*i+T-1`` of ``batches(corpus, "train", B,
  seed, split)`` (a fresh batch per inner step), and ``"outer"`` is item ``i``
  of ``batches(corpus, OUTER_PARTS[split], B, seed, split)``: the ``"outer"``
  part for meta-training, the held-out ``"validation"`` and ``"test"`` parts
  otherwise (of ``outer_corpus`` if given, by `TARGET_PARTS`).

  Args:
    corpus: the text.
    split: one of `metaflow.data.SPLITS`.
    seed: the data seed (>= 0).
    num_inner_steps: T.
    batch_size: B.
    rows: only these rows of every batch (``(start, stop)`` ranges of
      ``range(B)``, concatenated), reading only their sequences: one
      process's share when the sequences are split over processes. Default:
      all B.
    outer_corpus: the text of the outer batches (default ``corpus``): a
      target text, different from the training pool, whose loss V measures
      (its parts by `TARGET_PARTS`).

  Returns:
    A picklable dataset of `metaflow.data.NUM_EPISODES` episodes; item ``i``
    depends only on the arguments and ``i``.
  """
  data.check_split(split)
  num_inner_steps = check_int("num_inner_steps", num_inner_steps, 1)
  batch_size = check_int("batch_size", batch_size, 1)
  positions = (tuple(range(batch_size)) if rows is None else
               tuple(r for start, stop in rows for r in range(start, stop)))
  if not positions or not all(0 <= r < batch_size for r in positions):
    raise ValueError(f"rows {rows} must be non-empty ranges within the "
                     f"batch of {batch_size}.")
  make = _Episode(
      inner=_stream(corpus, "train", num_inner_steps * batch_size, seed, split),
      outer=(_stream(corpus, OUTER_PARTS[split], batch_size, seed, split)
             if outer_corpus is None else
             _stream(outer_corpus, TARGET_PARTS[split], batch_size, seed,
                     split)),
      num_inner_steps=num_inner_steps, rows=positions)
  return grain.MapDataset.range(data.NUM_EPISODES).map(make)
