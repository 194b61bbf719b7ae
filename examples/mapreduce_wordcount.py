"""Map-reduce over a folder of text files: count the words.

    python examples/mapreduce_wordcount.py            # a small generated corpus, embedded mesh
    python examples/mapreduce_wordcount.py DOCS/      # every *.txt under DOCS/
    TASKMESH_BROKER=tcp://host:5555 python examples/mapreduce_wordcount.py   # your own mesh

Map: one task per file, returning a ``collections.Counter`` of its words. Reduce: a tree of
``merge`` tasks, each given the *futures* of up to eight map (or merge) tasks as its argument.
Nothing waits here between the steps: the broker holds each merge until the tasks it refers to
have succeeded, then hands it their results, so the whole graph is submitted at once and the
first merges run while the last files are still being counted. The text itself travels with
each task, so the workers need no access to the folder, and the script checks the result
against a local count of the same files. It exits 0 only if both agree.
"""

from __future__ import annotations

import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import taskmesh
from taskmesh import task
from taskmesh.testing import connected

WORD = re.compile(r"[a-z']+")


FAN_IN = 8  # inputs per merge task


@task(retries=1, timeout=30.0)
def count_words(text: str) -> Counter[str]:
    """The map step: the words of one document (lower case), with their counts."""
    return Counter(WORD.findall(text.lower()))


@task(timeout=30.0)
def merge(counts: list[Counter[str]]) -> Counter[str]:
    """The reduce step: on the worker, ``counts`` holds the results of the tasks whose futures
    were passed in."""
    total: Counter[str] = Counter()
    for count in counts:
        total.update(count)
    return total


def reduce_tree(
    futures: list[taskmesh.TaskFuture[Counter[str]]],
) -> taskmesh.TaskFuture[Counter[str]]:
    """Submit merges of FAN_IN futures at a time, level by level, down to one future."""
    level = futures
    while len(level) > 1:
        level = [merge.submit(level[i : i + FAN_IN]) for i in range(0, len(level), FAN_IN)]
    return level[0] if futures else merge.submit([])


def make_corpus(folder: Path, n_files: int = 40, seed: int = 7) -> None:
    """Write ``n_files`` documents of a few thousand words drawn from a skewed vocabulary."""
    rng = random.Random(seed)
    vocabulary = [
        "the", "mesh", "broker", "worker", "task", "queue", "future", "result", "retry",
        "heartbeat", "socket", "pickle", "journal", "credit", "timeout", "priority", "it's",
        "a", "of", "and", "to", "in", "is", "that", "on", "for", "with", "as", "by", "map",
    ]  # fmt: skip
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf-like
    for i in range(n_files):
        lines = []
        for _ in range(rng.randint(20, 60)):
            words = rng.choices(vocabulary, weights, k=rng.randint(5, 15))
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice([".", ",", "!", "?"]))
        (folder / f"doc-{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def word_count(folder: Path) -> int:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        print(f"no *.txt files under {folder}", file=sys.stderr)
        return 2
    texts = {p: p.read_text(encoding="utf-8", errors="replace") for p in files}
    print(f"{len(files)} files, {sum(len(t) for t in texts.values()):,} characters in {folder}")

    with connected():
        started = time.monotonic()
        mapped = [count_words.submit(text) for text in texts.values()]
        final = reduce_tree(mapped)  # the whole graph is submitted before any result is back
        total = final.result(timeout=60)
        elapsed = time.monotonic() - started
        merges = merge_count(len(mapped))

    expected: Counter[str] = Counter()
    for text in texts.values():
        expected.update(count_words(text))  # a plain local call of the same function

    print(f"map: {len(mapped)} tasks, reduce: {merges} merge tasks, in {elapsed:.2f}s")
    print(f"{total.total():,} words, {len(total):,} distinct; the most common:")
    for word, n in total.most_common(8):
        print(f"  {word:<12} {n:>7,}")
    if total != expected:
        missing = (expected - total) + (total - expected)
        print(f"MISMATCH with the local count, e.g. {missing.most_common(5)}", file=sys.stderr)
        return 1
    print(f"word count OK: {total.total():,} words, the same as the local count")
    return 0


def merge_count(n: int) -> int:
    """How many merge tasks reduce_tree submits for n inputs."""
    merges = 0
    while n > 1:
        n = -(-n // FAN_IN)
        merges += n
    return merges


def main() -> int:
    if len(sys.argv) > 1:
        folder = Path(sys.argv[1])
        if not folder.is_dir():
            print(f"not a folder: {folder}", file=sys.stderr)
            return 2
        return word_count(folder)
    with tempfile.TemporaryDirectory(prefix="wordcount-") as tmp:
        make_corpus(Path(tmp))
        return word_count(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
