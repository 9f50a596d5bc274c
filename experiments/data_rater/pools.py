"""Pools the data rater was not tuned on: code, prose and structured text as
targets, each mixed with off-target text of the other kinds and with
corruptions of five kinds.

The texts come with the package or are generated, so a clone builds the
same pools with no download:

* **code**: metaflow's own Python source (``metaflow/**/*.py`` of the
  installed package, in sorted path order);
* **prose**: the works of Shakespeare (``metaflow/_data/tinyshakespeare.txt``);
* **structured**: JSON lines of synthetic records (`structured_text`:
  sensor readings, orders and server log entries, seeded).

A pool of target kind K (`build`) holds sequences of ``length`` bytes:

* clean K text (the on-target kind), from all but the last tenth of K's
  text; that tenth is the target text V is measured on;
* off-target text of each other kind (``off_target:<kind>``);
* corruptions of clean sequences (`CORRUPTIONS`): ``random_bytes``
  (uniform bytes), ``base64`` (a base64-encoded random blob, as binary
  attachments appear in web text), ``reversed_lines`` (every line's
  characters in reverse order: the same bytes, wrong order),
  ``repeated`` (a prefix of 4-16 bytes repeated to the length: truncated,
  repeated text) and ``utf16`` (the text in the wrong encoding, UTF-16-LE).

In `FRACTIONS` of the pool. The study on these pools is
`experiments.data_rater.study` with ``--pools``.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Callable

import numpy as np

from experiments.data_rater import study
from metaflow import data

KINDS_OF_TEXT = ("code", "prose", "structured")
CORRUPTIONS = ("random_bytes", "base64", "reversed_lines", "repeated",
               "utf16")
#: Each corruption's and each off-target kind's fraction of the pool (the
#: rest is clean).
FRACTIONS = {"corruption": 0.05, "off_target": 0.075}


def code_text() -> bytes:
  """metaflow's Python source, files in sorted path order, each followed by
  a blank line (about 324 KB)."""
  root = os.path.dirname(os.path.abspath(data.__file__))
  files = sorted(os.path.join(folder, name)
                 for folder, _, names in os.walk(root)
                 for name in names if name.endswith(".py"))
  return b"".join(open(f, "rb").read().rstrip(b"\n") + b"\n\n" for f in files)


def prose_text() -> bytes:
  """The works of Shakespeare, as bundled (1.1 MB)."""
  return open(data.bundled_path("tinyshakespeare.txt"), "rb").read()


_CITIES = ("Lyon", "Porto", "Oslo", "Quito", "Dakar", "Perth", "Kyoto",
           "Lima", "Turin", "Hanoi", "Accra", "Tartu", "Cusco", "Bergen")
_ITEMS = ("cable", "lamp", "kettle", "drill", "router", "chair", "mug",
          "battery", "monitor", "stapler", "tent", "charger")
_PATHS = ("/api/v1/users", "/api/v1/orders", "/static/app.js", "/login",
          "/api/v2/search", "/health", "/metrics", "/index.html")


def structured_text(num_bytes: int = 600_000, seed: int = 0) -> bytes:
  """``num_bytes`` (about) of JSON lines of three synthetic record types,
  seeded: sensor readings, orders and HTTP log entries."""
  rng = np.random.default_rng(seed)
  lines, size = [], 0
  while size < num_bytes:
    kind = rng.integers(3)
    day = f"2024-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind == 0:
      record = {"sensor": int(rng.integers(100, 999)),
                "city": str(rng.choice(_CITIES)), "date": day,
                "temp_c": round(float(rng.normal(14, 8)), 1),
                "humidity": int(rng.integers(20, 100)),
                "ok": bool(rng.random() < 0.95)}
    elif kind == 1:
      record = {"order": int(rng.integers(10_000, 99_999)), "date": day,
                "item": str(rng.choice(_ITEMS)),
                "qty": int(rng.integers(1, 12)),
                "price": round(float(rng.lognormal(3, 1)), 2),
                "city": str(rng.choice(_CITIES))}
    else:
      record = {"ts": f"{day}T{rng.integers(24):02d}:{rng.integers(60):02d}"
                      f":{rng.integers(60):02d}Z",
                "method": str(rng.choice(["GET", "GET", "POST", "PUT"])),
                "path": str(rng.choice(_PATHS)),
                "status": int(rng.choice([200, 200, 200, 201, 304, 404,
                                          500])),
                "ms": int(rng.lognormal(3, 0.8))}
    line = json.dumps(record) + "\n"
    lines.append(line)
    size += len(line)
  return "".join(lines).encode("utf-8")


TEXTS: dict[str, Callable[[], bytes]] = {
    "code": code_text, "prose": prose_text, "structured": structured_text}


def corrupt(kind: str, clean: np.ndarray, rng: np.random.Generator
            ) -> np.ndarray:
  """A corruption of kind ``kind`` (`CORRUPTIONS`) of one clean sequence
  ``uint8 [length]``, of the same length."""
  length = clean.shape[0]
  if kind == "random_bytes":
    return rng.integers(0, 256, length, dtype=np.uint8)
  if kind == "base64":
    blob = base64.b64encode(rng.integers(0, 256, length, dtype=np.uint8)
                            .tobytes())
    return np.frombuffer(blob[:length], np.uint8).copy()
  if kind == "reversed_lines":
    lines = clean.tobytes().split(b"\n")
    return np.frombuffer(b"\n".join(line[::-1] for line in lines),
                         np.uint8).copy()
  if kind == "repeated":
    prefix = clean[:rng.integers(4, 17)]
    return np.resize(prefix, length)
  if kind == "utf16":
    wide = clean.tobytes().decode("utf-8", "replace").encode("utf-16-le")
    return np.resize(np.frombuffer(wide, np.uint8), length)
  raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}.")


def build(out: str, target_kind: str, length: int, pool_bytes: int,
          seed: int, texts: dict[str, bytes] | None = None
          ) -> tuple[str, str, np.ndarray, tuple[str, ...]]:
  """Writes the pool of ``target_kind`` (module docstring) to
  ``OUT/pool.txt``, its target text to ``OUT/target.txt`` and
  ``OUT/pool_labels.json``.

  Args:
    out: the folder.
    target_kind: one of `KINDS_OF_TEXT`.
    length: bytes per sequence (``seq_len + 1``).
    pool_bytes: bytes of clean text in the pool (at most all but the last
      tenth of the target kind's text).
    seed: the seed of the corruptions, the off-target draws and the order.
    texts: the texts by kind (default: `TEXTS`' own).

  Returns:
    The pool's and the target's paths, each pool sequence's kind (an index
    into the names) and the names (``"clean"`` first).
  """
  if target_kind not in KINDS_OF_TEXT:
    raise ValueError(f"unknown kind of text {target_kind!r}; known: "
                     f"{KINDS_OF_TEXT}.")
  texts = texts or {kind: make() for kind, make in TEXTS.items()}
  rng = np.random.default_rng(seed)
  on = np.frombuffer(texts[target_kind], np.uint8)
  held = on.shape[0] // 10
  target, on = on[-held:], on[:-held]
  clean = study.cut(on[:pool_bytes], length)
  others = tuple(k for k in KINDS_OF_TEXT if k != target_kind)
  names = ("clean", *CORRUPTIONS, *(f"off_target:{k}" for k in others))
  total = int(round(clean.shape[0] / (
      1 - FRACTIONS["corruption"] * len(CORRUPTIONS)
      - FRACTIONS["off_target"] * len(others))))
  sequences, kinds = [clean], [np.zeros(clean.shape[0], np.int64)]
  for k, kind in enumerate(CORRUPTIONS, 1):
    n = int(round(FRACTIONS["corruption"] * total))
    sources = clean[rng.choice(clean.shape[0], n, replace=False)]
    sequences.append(np.stack([corrupt(kind, s, rng) for s in sources]))
    kinds.append(np.full(n, k))
  for k, kind in enumerate(others, 1 + len(CORRUPTIONS)):
    n = int(round(FRACTIONS["off_target"] * total))
    off = study.cut(np.frombuffer(texts[kind], np.uint8), length)
    sequences.append(off[rng.choice(off.shape[0], n, replace=False)])
    kinds.append(np.full(n, k))
  sequences, kinds = np.concatenate(sequences), np.concatenate(kinds)
  order = rng.permutation(sequences.shape[0])
  pool_path, target_path = study.write_pool(out, sequences[order], target)
  with open(os.path.join(out, "pool_labels.json"), "w") as f:
    json.dump({"names": list(names), "kinds": kinds[order].tolist()}, f)
  return pool_path, target_path, kinds[order], names
