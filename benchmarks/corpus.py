"""Natural English text for the benchmarks: Debian's fortune cookie files.

The text is not ours and is not committed: it comes from the Debian packages ``fortunes``
and ``fortunes-min`` (BSD-licensed fortune-mod data; thousands of quotations, jokes, poems
and short stories by many authors), fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` (no root install needed), or read from an installed ``/usr/share/games/fortunes``.
About 1.6 MB of prose, ~400K tokens of SmolLM2's tokenizer: enough for 128K-token prompts
without repeating text inside one prompt.

The corpus is written once to ``benchmarks/data/fortunes.txt`` (git-ignored) together with
the packages' copyright file and a small JSON manifest (source, package version, sha256).
Machines without a Debian registry (the GPU machine) get the folder carried over:

    python -m benchmarks.corpus            # here: fetch + write benchmarks/data/
    # then send benchmarks/data along with the benchmark command

Reuse: ``load_text()`` returns the whole corpus as one string; ``token_windows`` cuts
non-overlapping windows of token ids from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "CORPUS_FILE",
    "DATA_DIR",
    "FORTUNE_FILES",
    "build_text",
    "ensure_corpus",
    "load_text",
    "parse_fortunes",
    "synthetic_text",
    "token_windows",
]

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_FILE = "fortunes.txt"
MANIFEST_FILE = "fortunes.json"
COPYRIGHT_FILE = "fortunes-COPYRIGHT"
PACKAGES = ("fortunes", "fortunes-min")
SYSTEM_DIR = Path("/usr/share/games/fortunes")

#: Prose files in a fixed order (the order of the text). Left out on purpose: ascii-art,
#: computers/linux/perl/debian (code and shell snippets), zippy (word salad), knghtbrd (IRC
#: logs), translate-me, disclaimer, drugs, ethnic.
FORTUNE_FILES = (
    "literature", "wisdom", "people", "science", "politics", "work", "men-women",
    "humorists", "education", "sports", "food", "love", "medicine", "kids", "platitudes",
    "songs-poems", "law", "news", "pets", "magic", "goedel", "miscellaneous", "fortunes",
    "riddles", "startrek", "tao", "art", "definitions", "cookie", "paradoxum", "pratchett",
)


def parse_fortunes(raw: str) -> list[str]:
    """Split one fortune file (entries separated by lines holding only ``%``) into entries.

    Lines are stripped of indentation and trailing blanks; entries that are mostly not
    letters (ASCII art, tables) or empty are dropped.
    """
    out: list[str] = []
    entry: list[str] = []

    def flush() -> None:
        text = "\n".join(line for line in entry).strip()
        entry.clear()
        if not text or "\ufffd" in text:
            return
        visible = [c for c in text if not c.isspace()]
        letters = sum(c.isalpha() for c in visible)
        if letters < 0.6 * len(visible) or not any(c.islower() for c in text):
            return
        out.append(text)

    for line in raw.splitlines():
        if line.strip() == "%":
            flush()
        else:
            entry.append(" ".join(line.split()))
    flush()
    return out


def build_text(fortunes_dir: Path, files: Sequence[str] = FORTUNE_FILES) -> str:
    """The corpus: every kept entry of ``files`` (in that order), separated by blank lines."""
    parts: list[str] = []
    missing = []
    for name in files:
        p = fortunes_dir / name
        if not p.is_file():
            missing.append(name)
            continue
        parts.extend(parse_fortunes(p.read_bytes().decode("utf-8", errors="replace")))
    if not parts:
        raise FileNotFoundError(f"no fortune files {list(files)} under {fortunes_dir}")
    if missing:
        logger.warning("fortune files missing under %s: %s", fortunes_dir, missing)
    return "\n\n".join(parts) + "\n"


def _download_debs(workdir: Path) -> tuple[Path, Path | None, str]:
    """apt-get download + dpkg-deb -x; returns (fortunes dir, copyright file, version)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            "the benchmark corpus comes from Debian's 'fortunes' package, but apt-get/dpkg-deb "
            "are not available here. Run `python -m benchmarks.corpus` on a Debian machine and "
            f"copy {DATA_DIR} here, or install the package (apt-get install fortunes)."
        )

    hint = (f"Without a Debian registry here, run `python -m benchmarks.corpus` on a machine that has one "
            f"and copy {DATA_DIR} over (on the GPU machine: carry benchmarks/data).")

    def apt(*args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["apt-get", *args], cwd=workdir, capture_output=True, text=True, check=False,
                                  timeout=120)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"apt-get {' '.join(args)} timed out. {hint}") from e

    r = apt("download", *PACKAGES)
    if r.returncode != 0:  # package lists may be missing on a fresh machine
        apt("update", "-qq")
        r = apt("download", *PACKAGES)
    if r.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} failed: {r.stderr.strip()[-300:]}. {hint}")
    version = ""
    root = workdir / "root"
    for deb in sorted(workdir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        if deb.name.startswith("fortunes_"):
            version = deb.name.split("_")[1].replace("%3a", ":")
    cr = root / "usr/share/doc/fortunes/copyright"
    return root / "usr/share/games/fortunes", (cr if cr.is_file() else None), version


def ensure_corpus(data_dir: Path = DATA_DIR, download: bool = True) -> Path:
    """Path of the corpus text file, creating it (and its manifest and copyright) if needed.

    Order of sources: an existing ``data_dir/fortunes.txt``; the Debian packages fetched with
    apt-get (when ``download``); an installed ``/usr/share/games/fortunes``.
    """
    data_dir = Path(data_dir)
    target = data_dir / CORPUS_FILE
    if target.is_file():
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if download and shutil.which("apt-get"):
            src, copyright_file, version = _download_debs(Path(tmp))
            source = f"debian:{','.join(PACKAGES)}={version}"
        elif SYSTEM_DIR.is_dir():
            src, version = SYSTEM_DIR, ""
            cr = Path("/usr/share/doc/fortunes/copyright")
            copyright_file = cr if cr.is_file() else None
            source = f"installed:{SYSTEM_DIR}"
        else:
            raise RuntimeError(
                f"no benchmark corpus at {target} and no way to make one here: run "
                "`python -m benchmarks.corpus` on a machine with apt-get (Debian) and copy "
                f"{data_dir} over, or `apt-get install fortunes`."
            )
        text = build_text(src)
        if copyright_file is not None:
            shutil.copyfile(copyright_file, data_dir / COPYRIGHT_FILE)
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_text(text, encoding="utf-8")
    manifest = {
        "source": source,
        "files": list(FORTUNE_FILES),
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "license": "BSD (fortune-mod); see " + COPYRIGHT_FILE,
    }
    (data_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_target, target)
    logger.info("benchmark corpus written: %s (%d chars, %s)", target, len(text), source)
    return target


def load_text(data_dir: Path = DATA_DIR, download: bool = True) -> str:
    """The whole corpus as one string (see ``ensure_corpus``)."""
    return ensure_corpus(data_dir, download).read_text(encoding="utf-8")


def corpus_info(data_dir: Path = DATA_DIR) -> dict:
    """The manifest of an existing corpus ({} when absent)."""
    p = Path(data_dir) / MANIFEST_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def synthetic_text(n_words: int = 20000, seed: int = 0) -> str:
    """Deterministic pseudo-English for CPU dry runs (never used for reported numbers)."""
    import random

    rng = random.Random(seed)
    words = ("the of and to in is was that for it with as his on be at by had not are but "  # noqa: SIM905
             "from or have an they which one you were all her she there would their we him "
             "been has when who will more no if out so said what up its about into than them "
             "can only other new some could time these two may then do first any my now such "
             "like our over man me even most made after also did many before must through back "
             "years where much your way well down should because each just those people how "
             "too little state good very make world still own see men work long get here between "
             "both life being under never day same another know while last might us great old "
             "year off come since against go came right used take three").split()
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(words))
        if len(sentence) > rng.randint(6, 18):
            s = " ".join(sentence)
            out.append(s[0].upper() + s[1:] + ".")
            sentence = []
    return " ".join(out) + "\n"


def token_windows(ids: Sequence[int], length: int, count: int, start: int = 0) -> list[list[int]]:
    """``count`` non-overlapping windows of ``length`` token ids, the first at ``start``.

    Windows wrap around the end of ``ids`` when the corpus is too short (logged: repeated text
    inside one window changes attention, so reported runs should not need it).
    """
    n = len(ids)
    if n == 0 or length < 1:
        raise ValueError(f"need a non-empty corpus and length >= 1 (got {n} ids, length {length})")
    if start + length * count > n:
        logger.warning("corpus has %d tokens, %d windows of %d need %d: wrapping around",
                       n, count, length, start + length * count)
    out = []
    for w in range(count):
        a = start + w * length
        out.append([ids[(a + i) % n] for i in range(length)])
    return out


def _main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--tokenizer", help="also count tokens with this tokenizer (path)")
    a = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = ensure_corpus(a.data_dir)
    text = p.read_text(encoding="utf-8")
    line = f"{p}: {len(text)} chars, {corpus_info(a.data_dir).get('source', '?')}"
    if a.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        line += f", {len(tok(text, add_special_tokens=False).input_ids)} tokens"
    print(line)


if __name__ == "__main__":
    _main()
