"""A second natural-text corpus: Jane Austen's six novels, from Debian's ``r-cran-janeaustenr``.

Long continuous narrative prose (public-domain texts; the R package is MIT-licensed), unlike the
short quotations of the fortune corpus (:mod:`benchmarks.corpus`), so quality numbers measured on
both are not tuned to one kind of text. The package ships the novels as an R lazy-load
database (``data/Rdata.rdb``: one zlib-compressed R serialization per novel, each a character
vector of lines); it is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no
root install, no R needed) and the character vectors are read with a small XDR reader below.

Written once to ``benchmarks/data/austen.txt`` (git-ignored) with a JSON manifest; the novels
follow each other in the package's order (Emma, Mansfield Park, Northanger Abbey, Persuasion,
Pride and Prejudice, Sense and Sensibility), lines joined with newlines. About 4 MB of text.

    python -m benchmarks.corpus_austen          # fetch + write benchmarks/data/austen.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from benchmarks.corpus import DATA_DIR

__all__ = ["AUSTEN_FILE", "ensure_austen", "load_austen", "read_rdb_character_vectors"]

logger = logging.getLogger(__name__)

PACKAGE = "r-cran-janeaustenr"
AUSTEN_FILE = "austen.txt"
MANIFEST_FILE = "austen.json"
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"

_STRSXP, _CHARSXP = 16, 9


def _read_character_vector(blob: bytes) -> list[str]:
    """Lines of one R serialization (XDR, format 2 or 3) holding a plain character vector."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    p = 2
    version = struct.unpack(">i", blob[p : p + 4])[0]
    p += 12  # version, writer's R version, minimal reader version
    if version == 3:  # native encoding name
        n = struct.unpack(">i", blob[p : p + 4])[0]
        p += 4 + n
    flags, n = struct.unpack(">ii", blob[p : p + 8])
    p += 8
    if flags & 0xFF != _STRSXP:
        raise ValueError(f"expected a character vector (STRSXP), got SEXP type {flags & 0xFF}")
    lines = []
    for _ in range(n):
        f, length = struct.unpack(">ii", blob[p : p + 8])
        p += 8
        if f & 0xFF != _CHARSXP:
            raise ValueError(f"expected CHARSXP, got SEXP type {f & 0xFF}")
        if length == -1:  # NA_character_
            lines.append("")
            continue
        lines.append(blob[p : p + length].decode("utf-8", errors="replace"))
        p += length
    return lines


def read_rdb_character_vectors(rdb: Path) -> list[list[str]]:
    """Every object of an R lazy-load database, in file order, each a list of lines.

    Each object is a 4-byte big-endian length followed by a zlib stream (R's default
    ``compress = TRUE``)."""
    data = Path(rdb).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj()
        blob = d.decompress(data[pos + 4 :])
        out.append(_read_character_vector(blob))
        pos = len(data) - len(d.unused_data)
    return out


def ensure_austen(data_dir: Path = DATA_DIR) -> Path:
    """Path of ``austen.txt``, fetching the Debian package once if it is not there yet."""
    data_dir = Path(data_dir)
    target = data_dir / AUSTEN_FILE
    if target.is_file():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"the Austen corpus comes from Debian's {PACKAGE}: run `python -m benchmarks.corpus_austen` "
                           f"on a Debian machine and copy {data_dir} here")
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
            r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {PACKAGE} failed: {r.stderr.strip()[-300:]}")
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        novels = read_rdb_character_vectors(Path(tmp) / "root" / RDB)
        version = deb.name.split("_")[1]
    text = "\n\n\n".join("\n".join(lines).strip() for lines in novels) + "\n"
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_text(text, encoding="utf-8")
    manifest = {"source": f"debian:{PACKAGE}={version}", "novels": len(novels), "chars": len(text),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "license": "novels public domain; R package MIT (Julia Silge)"}
    (data_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_target, target)
    logger.info("Austen corpus written: %s (%d chars, %s)", target, len(text), manifest["source"])
    return target


def load_austen(data_dir: Path = DATA_DIR) -> str:
    """The six novels as one string (see :func:`ensure_austen`)."""
    return ensure_austen(data_dir).read_text(encoding="utf-8")


def austen_info(data_dir: Path = DATA_DIR) -> dict:
    p = Path(data_dir) / MANIFEST_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = ensure_austen(a.data_dir)
    print(f"{p}: {p.stat().st_size} bytes, {austen_info(a.data_dir).get('source')}")
