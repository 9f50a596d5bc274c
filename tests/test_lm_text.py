"""Byte-level text through Grain: packing, disjoint parts, shuffled streams,
episodes, pickling, worker processes and input errors."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
from absl import flags

from metaflow import data
from tasks.lm import text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = data.bundled_path("tinyshakespeare.txt")

L = 7  # seq_len of the small corpora; a sequence is 8 bytes.
W = L + 1


def letters(seed: int, size: int) -> bytes:
  """``size`` random lowercase ASCII letters."""
  return np.random.default_rng(seed).integers(97, 123, size, np.uint8).tobytes()


def write(tmp_path, name: str, content: bytes) -> str:
  path = os.path.join(tmp_path, name)
  with open(path, "wb") as f:
    f.write(content)
  return path


def rows(array: np.ndarray) -> list[bytes]:
  """The rows of ``[..., N]`` as bytes."""
  return [r.tobytes() for r in array.reshape(-1, array.shape[-1])]


def part_rows(corpus: text.TextCorpus, part: str) -> list[bytes]:
  source = corpus.part(part)
  return [source[i].tobytes() for i in range(len(source))]


@pytest.fixture
def two_files(tmp_path):
  """Files of 20 sequences (+3 bytes) and 40 sequences, and their bytes."""
  a, b = letters(0, 20 * W + 3), letters(1, 40 * W)
  return (write(tmp_path, "a.txt", a), write(tmp_path, "b.txt", b)), (a, b)


@pytest.fixture
def big_file(tmp_path):
  """A file of 8,000 sequences (grain's shuffle is slow on tiny parts)."""
  return write(tmp_path, "big.txt", letters(6, 8_000 * W))


def one_line_error(excinfo, *fragments: str):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


# ---------------------------------------------------------------- tokens
def test_encode_decode_round_trip():
  s = "naïve café: ✓ λ 🐍\n"
  tokens = text.encode(s)
  assert tokens.dtype == np.uint8 and tokens.tobytes() == s.encode("utf-8")
  assert text.decode(tokens) == s
  assert text.decode(list(tokens)) == s
  assert text.decode(tokens.astype(np.int32)[None]) == s
  np.testing.assert_array_equal(text.encode(b"\xff\x00a"), [255, 0, 97])
  assert text.decode(np.array([104, 0xFF, 105], np.uint8)) == "h\ufffdi"
  assert text.VOCAB_SIZE == 256
  with pytest.raises(ValueError, match="byte tokens"):
    text.decode(np.array([1, 256]))


# ----------------------------------------------------- packing and parts
def test_packing_and_parts_in_order_across_two_files(two_files):
  paths, (a, b) = two_files
  corpus = text.TextCorpus(paths, seq_len=L)
  seq = lambda doc, k: doc[k * W:(k + 1) * W]
  # 80/10/5/5% of each file's sequences, in order: a 16/2/1/1, b 32/4/2/2.
  expected = {"train": [(a, 0, 16), (b, 0, 32)],
              "outer": [(a, 16, 18), (b, 32, 36)],
              "validation": [(a, 18, 19), (b, 36, 38)],
              "test": [(a, 19, 20), (b, 38, 40)]}
  everything = []
  for part, ranges in expected.items():
    want = [seq(doc, k) for doc, lo, hi in ranges for k in range(lo, hi)]
    got = part_rows(corpus, part)
    assert got == want, part
    assert corpus.num_sequences(part) == len(want)
    assert all(len(r) == W for r in got)
    everything += got
  # Disjoint and covering: every sequence of both files exactly once.
  all_sequences = ([seq(a, k) for k in range(20)]
                   + [seq(b, k) for k in range(40)])
  assert sorted(everything) == sorted(all_sequences)
  assert len(set(everything)) == 60 == corpus.num_sequences()
  assert corpus.part("test")[-1].tobytes() == seq(b, 39)
  with pytest.raises(IndexError):
    corpus.part("test")[3]
  with pytest.raises(ValueError, match="Unknown text part 'dev'"):
    corpus.part("dev")


def test_no_sequence_crosses_a_file_boundary(tmp_path):
  paths = (write(tmp_path, "a.txt", b"a" * (25 * W + 5)),
           write(tmp_path, "b.txt", b"b" * (30 * W + 7)))
  corpus = text.TextCorpus(paths, seq_len=L)
  assert corpus.num_sequences() == 55
  for part in text.PARTS:
    for r in part_rows(corpus, part):
      assert r in (b"a" * W, b"b" * W)


# --------------------------------------------------------------- streams
def test_each_epoch_is_a_new_permutation(two_files):
  corpus = text.TextCorpus(two_files[0], seq_len=L)
  index = {r: i for i, r in enumerate(part_rows(corpus, "train"))}
  n = len(index)  # 48 = 12 batches of 4.
  stream = text.batches(corpus, "train", 4, seed=0)
  assert stream[0].shape == (4, W) and stream[0].dtype == np.uint8
  order = [index[r] for k in range(2 * n // 4) for r in rows(stream[k])]
  first, second = order[:n], order[n:]
  assert sorted(first) == list(range(n)) == sorted(second)
  assert first != list(range(n)) and first != second
  assert len(stream) > 2**40  # Effectively infinite.


def test_streams_are_deterministic_and_independent(two_files):
  corpus = text.TextCorpus(two_files[0], seq_len=L)
  first = lambda **kw: np.concatenate(
      [text.batches(corpus, kw.pop("part", "train"), 4, **kw)[k]
       for k in range(3)])
  base = first(seed=0)
  np.testing.assert_array_equal(base, first(seed=0))
  assert not np.array_equal(base, first(seed=1))
  assert not np.array_equal(base, first(seed=0, split="validation"))
  # A stream's next epochs are not another seed's first epoch.
  epoch2 = np.concatenate([text.batches(corpus, "train", 4, 0)[k]
                           for k in range(12, 15)])
  for seed in range(1, 4):
    assert not np.array_equal(epoch2, first(seed=seed))
  with pytest.raises(ValueError, match="seed"):
    text.batches(corpus, "train", 4, seed=-1)
  with pytest.raises(ValueError, match="batch_size"):
    text.batches(corpus, "train", 0, seed=0)


def test_random_access_and_iterator_resume(big_file):
  corpus = text.TextCorpus(big_file, seq_len=L)
  in_order = list(text.batches(corpus, "outer", 3, 5)[:40])
  fresh = text.batches(corpus, "outer", 3, 5)
  np.testing.assert_array_equal(fresh[37], in_order[37])
  # The position of a Grain iterator is all that resuming needs.
  it = iter(text.batches(corpus, "outer", 3, 5).to_iter_dataset())
  for _ in range(5):
    next(it)
  state = it.get_state()
  resumed = iter(text.batches(corpus, "outer", 3, 5).to_iter_dataset())
  resumed.set_state(state)
  for k in range(5, 9):
    np.testing.assert_array_equal(next(resumed), in_order[k])


# -------------------------------------------------------------- episodes
def test_episodes_shapes_and_parts():
  corpus = text.TextCorpus(seq_len=63)  # Embedded corpus.
  parts = {p: set(part_rows(corpus, p)) for p in text.PARTS}
  T, B = 3, 2
  for split in data.SPLITS:
    episodes = text.lm_episodes(corpus, split, 0, T, B)
    assert len(episodes) == data.NUM_EPISODES
    train = text.batches(corpus, "train", B, 0, split)
    for i in (0, 7):
      episode = episodes[i]
      assert episode["inner"].shape == (T, B, 64)
      assert episode["outer"].shape == (B, 64)
      assert episode["inner"].dtype == episode["outer"].dtype == np.uint8
      np.testing.assert_array_equal(
          episode["inner"], np.stack([train[T * i + t] for t in range(T)]))
      assert set(rows(episode["inner"])) <= parts["train"]
      outer = set(rows(episode["outer"]))
      assert outer <= parts[text.OUTER_PARTS[split]]
      for part in text.PARTS:
        if part != text.OUTER_PARTS[split]:
          assert not outer & parts[part], (split, part)
  a = data.take(text.lm_episodes(corpus, "train", 0, T, B), 2)
  b = data.take(text.lm_episodes(corpus, "train", 0, T, B), 2)
  c = data.take(text.lm_episodes(corpus, "train", 1, T, B), 2)
  d = data.take(text.lm_episodes(corpus, "validation", 0, T, B), 2)
  np.testing.assert_array_equal(a["inner"], b["inner"])
  np.testing.assert_array_equal(a["outer"], b["outer"])
  assert not np.array_equal(a["inner"], c["inner"])
  assert not np.array_equal(a["inner"], d["inner"])
  with pytest.raises(ValueError, match="Unknown split 'dev'"):
    text.lm_episodes(corpus, "dev", 0, T, B)
  with pytest.raises(ValueError, match="num_inner_steps"):
    text.lm_episodes(corpus, "train", 0, 0, B)


def test_target_text_gives_outer_batches_from_all_but_its_held_out_parts(
    tmp_path):
  """With a separate target text, meta-training's outer batches come from
  its first 80% (no inner batch reads it), evaluation's from its held-out
  parts; the inner batches stay the pool's."""
  pool = text.TextCorpus(write(tmp_path, "pool.txt", letters(0, 4000)), L)
  target = text.TextCorpus(write(tmp_path, "target.txt", letters(1, 4000)),
                           L)
  parts = {p: set(part_rows(target, p)) for p in text.PARTS}
  outer = {}
  for split, part in text.TARGET_PARTS.items():
    episodes = data.take(text.lm_episodes(pool, split, 0, 2, 8,
                                          outer_corpus=target), 40)
    outer[split] = set(rows(episodes["outer"]))
    assert outer[split] <= parts[part], split
    assert set(rows(episodes["inner"])) <= set(part_rows(pool, "train"))
  # 320 draws from the 400 sequences of the train part: more than the
  # outer part's 50.
  assert len(outer["train"]) > len(parts["outer"])


def test_pickling_keeps_no_text(tmp_path):
  path = write(tmp_path, "big.txt", letters(2, 200_000))
  for corpus in (text.TextCorpus(path, seq_len=L), text.TextCorpus(seq_len=L)):
    episodes = text.lm_episodes(corpus, "train", 3, 2, 4)
    expected = data.take(episodes, 3)  # Opens the memory maps.
    assert len(pickle.dumps(corpus)) < 2_000
    assert len(pickle.dumps(episodes)) < 10_000
    copy = pickle.loads(pickle.dumps(episodes))  # Also after use.
    got = data.take(copy, 3)
    np.testing.assert_array_equal(got["inner"], expected["inner"])
    np.testing.assert_array_equal(got["outer"], expected["outer"])
    stream = text.batches(corpus, "test", 2, 0)
    first = stream[4]
    assert len(pickle.dumps(stream)) < 10_000
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(stream))[4], first)


def test_worker_process_gives_the_same_episodes(big_file):
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  corpus = text.TextCorpus(big_file, seq_len=L)
  episodes = text.lm_episodes(corpus, "validation", 0, 2, 3)
  want = data.take(episodes, 4)  # In-process: meta-batches of 2 episodes.
  workers = iter(data.meta_batches(episodes, 2, num_workers=1))
  for k in range(2):
    got = next(workers)
    np.testing.assert_array_equal(got["inner"], want["inner"][2 * k:2 * k + 2])
    np.testing.assert_array_equal(got["outer"], want["outer"][2 * k:2 * k + 2])


# ---------------------------------------------------------------- corpora
def test_embedded_corpus():
  raw = text.embedded_text()
  assert len(raw) > 400_000
  raw.decode("utf-8")  # Valid UTF-8.
  corpus = text.TextCorpus()
  assert corpus.seq_len == 128
  assert corpus.num_sequences() == len(raw) // 129
  assert corpus.part("train")[0].tobytes() == raw[:129]
  assert "embedded" in repr(corpus)


def test_tinyshakespeare():
  corpus = text.TextCorpus([SHAKESPEARE], seq_len=128)
  assert corpus.num_sequences() == 1115394 // 129
  with open(SHAKESPEARE, "rb") as f:
    assert corpus.part("train")[1].tobytes() == f.read(258)[129:]


# ------------------------------------------------------------------ errors
def test_path_errors(tmp_path):
  missing = os.path.join(tmp_path, "missing.txt")
  with pytest.raises(FileNotFoundError) as e:
    text.TextCorpus([missing], seq_len=L)
  one_line_error(e, missing, "does not exist")
  with pytest.raises(FileNotFoundError) as e:
    text.TextCorpus([str(tmp_path)], seq_len=L)
  one_line_error(e, str(tmp_path), "is a directory")
  empty = write(tmp_path, "empty.txt", b"")
  with pytest.raises(ValueError) as e:
    text.TextCorpus([empty], seq_len=L)
  one_line_error(e, empty, "is empty")
  short = write(tmp_path, "short.txt", b"hello")
  with pytest.raises(ValueError) as e:
    text.TextCorpus([short], seq_len=L)
  one_line_error(e, short, "has 5 bytes", f"seq_len + 1 = {W}",
                 "use seq_len <= 4")
  ok = write(tmp_path, "ok.txt", letters(3, 100 * W))
  with pytest.raises(ValueError) as e:
    text.TextCorpus([ok, os.path.join(tmp_path, ".", "ok.txt")], seq_len=L)
  one_line_error(e, "given twice")


def test_size_errors(tmp_path):
  for seq_len in (0, -3, True, 2.0):
    with pytest.raises(ValueError) as e:
      text.TextCorpus(seq_len=seq_len)
    one_line_error(e, "seq_len must be an int >= 1")
  small = write(tmp_path, "small.txt", letters(4, 9 * W))
  with pytest.raises(ValueError) as e:
    text.TextCorpus(small, seq_len=L)
  one_line_error(e, small, "gives 9 sequences", "validation 0",
                 "at least one", "shorter seq_len")
  assert text.TextCorpus(small, seq_len=3).num_sequences() == 18


def test_non_utf8_is_used_as_bytes_with_a_warning(tmp_path):
  content = letters(5, 100 * W)
  content = content[:21] + b"\xff\xfe" + content[23:]
  path = write(tmp_path, "latin.txt", content)
  with pytest.warns(UnicodeWarning, match="offset 21") as record:
    corpus = text.TextCorpus(path, seq_len=L)
  message = str(record[0].message)
  assert path in message and "used as they are" in message
  assert corpus.part("train")[2].tobytes() == content[16:24]
  with pytest.raises(ValueError) as e:
    text.TextCorpus(path, seq_len=L, strict_utf8=True)
  one_line_error(e, path, "not valid UTF-8", "offset 21")
  valid = write(tmp_path, "valid.txt", "é".encode() * 50)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text.TextCorpus(valid, seq_len=1, strict_utf8=True)


def test_utf8_check_is_incremental(tmp_path):
  path = write(tmp_path, "mixed.txt", "aé✓🐍b".encode())  # 1+2+3+4+1 bytes.
  for chunk in (1, 2, 3, 5, 1 << 20):
    assert text.first_invalid_utf8(path, chunk) is None
  bad = write(tmp_path, "bad.txt", "aé✓".encode() + b"\xe2\x9c" + b"zz")
  truncated = write(tmp_path, "cut.txt", "aé✓".encode() + b"\xf0\x9f\x90")
  for chunk in (1, 2, 4, 1 << 20):
    assert text.first_invalid_utf8(bad, chunk) == 6
    assert text.first_invalid_utf8(truncated, chunk) == 6


def test_episodes_of_some_rows_read_only_those_rows():
  """A process's share of the sequences (rows of every batch) equals the
  same rows of the full episodes; Task.local_episodes' generic cut agrees."""
  from metaflow.task import TakeExamples
  corpus = text.TextCorpus(seq_len=31)
  T, B, rows = 2, 6, ((1, 3), (4, 5))
  full = text.lm_episodes(corpus, "train", 0, T, B)
  share = text.lm_episodes(corpus, "train", 0, T, B, rows=rows)
  cut = full.map(TakeExamples({"inner": 1, "outer": 0}, rows))
  for i in (0, 5):
    for episode in (share[i], cut[i]):
      np.testing.assert_array_equal(episode["inner"],
                                    full[i]["inner"][:, [1, 2, 4]])
      np.testing.assert_array_equal(episode["outer"],
                                    full[i]["outer"][[1, 2, 4]])
  with pytest.raises(ValueError, match="rows"):
    text.lm_episodes(corpus, "train", 0, T, B, rows=((4, 7),))


def test_synthetic_bytes_for_any_length():
  """data_path "synthetic": random bytes, enough for every part at lengths
  no bundled text covers, the same in every process (seed 0)."""
  corpus = text.TextCorpus(text.SYNTHETIC, seq_len=131072)
  assert min(corpus.num_sequences(p) for p in text.PARTS) >= 1
  first = corpus.sequence("train", 0)
  assert first.shape == (131073,) and first.dtype == np.uint8
  again = text.TextCorpus([text.SYNTHETIC], seq_len=131072)
  np.testing.assert_array_equal(again.sequence("test", 0),
                                corpus.sequence("test", 0))
