"""Dataset import: preference pairs from a file into the store, all or nothing.

Formats:
- `hh`: Anthropic HH-RLHF lines `{"chosen": "...", "rejected": "..."}`, each a whole dialogue
  `"\\n\\nHuman: ...\\n\\nAssistant: ..."`; the two share every turn but the last assistant reply.
- `jsonl`: `{"prompt", "chosen", "rejected"}`, each a plain string or a list of chat messages
  (TRL's conversational format); without `prompt`, chosen and rejected are whole conversations
  and the prompt is their shared beginning.

Files may be gzipped, and may start with a UTF-8 byte order mark. Texts are stripped of surrounding
whitespace, whichever form they come in. A bad line (broken JSON, wrong encoding, a missing or empty
field, a role other than system, user or assistant, a chosen equal to its rejected) is skipped and
reported with its line number; it never stops the import.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.database import GOLD_TAKEN, NewPair, Store

FORMATS = ("hh", "jsonl")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
ROLES = ("system", "user", "assistant")  # the roles every chat template (the demo's too) knows


class BadRow(ValueError):
    """A line that cannot become a pair; the message says why."""


@dataclass
class ImportReport:
    path: str
    lines: int = 0
    added: int = 0
    already_present: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    what: str = "pairs"

    def summary(self, limit: int = 20) -> str:
        out = [(f"{self.path}: {self.lines} lines, {self.added} {self.what} added, "
                f"{self.already_present} already in the store, {len(self.skipped)} skipped")]
        for line, why in self.skipped[:limit]:
            out.append(f"  line {line}: {why}")
        if len(self.skipped) > limit:
            out.append(f"  ... and {len(self.skipped) - limit} more (see --report)")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "lines": self.lines, "added": self.added, "already_present": self.already_present,
                "skipped": [{"line": line, "reason": why} for line, why in self.skipped]}


def parse_hh(row: dict[str, Any]) -> NewPair:
    chosen = _hh_turns(_text_field(row, "chosen"))
    rejected = _hh_turns(_text_field(row, "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("chosen and rejected differ before their last reply")
    return _pair(chosen[:-1], chosen[-1], rejected[-1])


def _hh_turns(dialogue: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split(dialogue)
    if parts[0].strip() or len(parts) < 5:
        raise BadRow("not an HH dialogue (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]


def parse_jsonl(row: dict[str, Any]) -> NewPair:
    if "prompt" not in row:
        chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise BadRow("without 'prompt', chosen and rejected must share every turn but the last")
        return _pair(chosen[:-1], chosen[-1], rejected[-1])
    prompt = _messages(row, "prompt")
    return _pair(prompt, _reply(row, "chosen"), _reply(row, "rejected"))


def _messages(row: dict[str, Any], key: str) -> list[dict[str, str]]:
    value = row.get(key)
    if isinstance(value, str):  # stripped, as the turns of a message list and of an HH dialogue are
        return [{"role": "user", "content": _text_field(row, key).strip()}]
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' is missing, empty or not a string or a list of messages")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow(f"'{key}' has a message without a string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRow(f"'{key}' has a message with role {m['role']!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"].strip()})
    return out


def _reply(row: dict[str, Any], key: str) -> dict[str, str]:
    if isinstance(row.get(key), str):
        return {"role": "assistant", "content": _text_field(row, key).strip()}
    messages = _messages(row, key)
    if len(messages) != 1:
        raise BadRow(f"'{key}' must be one assistant message, got {len(messages)}")
    return messages[0]


def _text_field(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise BadRow(f"'{key}' is missing or not a string")
    if not value.strip():
        raise BadRow(f"'{key}' is empty")
    return value


def _pair(prompt: list[dict[str, str]], chosen: dict[str, str], rejected: dict[str, str]) -> NewPair:
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow("the conversation must end with a user turn before the replies")
    if chosen["role"] != "assistant" or rejected["role"] != "assistant":
        raise BadRow("the replies must be assistant turns")
    if any(not m["content"] for m in prompt):
        raise BadRow("the prompt has an empty turn")
    if not chosen["content"] or not rejected["content"]:
        raise BadRow("empty reply")
    if chosen["content"] == rejected["content"]:
        raise BadRow("chosen is the same as rejected")
    for text in [m["content"] for m in prompt] + [chosen["content"], rejected["content"]]:
        _unicode(text)
    return NewPair(messages=prompt, chosen=chosen["content"], rejected=rejected["content"])


def _unicode(text: str) -> None:
    """JSON's escapes can spell half of a surrogate pair (`"\\ud800"`), which is no character: the
    store could not encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow(f"a text holds {text[e.start]!r}, half of a surrogate pair: not valid Unicode") from None


def _row(line: bytes, first: bool) -> dict[str, Any]:
    """One line as a JSON object, or the reason it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRow("not valid UTF-8") from None
    if first:
        text = text.removeprefix("\ufeff")  # a byte order mark, as some editors write
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow(f"broken JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadRow("broken JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BadRow(f"broken JSON: {str(e).split(':')[0]}") from None
    if not isinstance(row, dict):
        raise BadRow("not a JSON object")
    return row


def read_pairs(path: str | Path, fmt: str) -> tuple[list[NewPair], ImportReport]:
    """Parse a file; returns the good pairs and a report of every skipped line."""
    numbered, report = _read_numbered(path, fmt)
    return [pair for _, pair in numbered], report


def _read_numbered(path: str | Path, fmt: str) -> tuple[list[tuple[int, NewPair]], ImportReport]:
    """`read_pairs`, each pair with its line number."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    parse = parse_hh if fmt == "hh" else parse_jsonl
    path = Path(path)
    report = ImportReport(path=str(path))
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: broken gzip file: {e}") from None
    pairs: list[tuple[int, NewPair]] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        report.lines = number
        if not line.strip():
            continue
        try:
            pairs.append((number, parse(_row(line, number == 1))))
        except BadRow as e:
            report.skipped.append((number, str(e)))
    return pairs, report


def import_file(store: Store, path: str | Path, fmt: str) -> ImportReport:
    """Import a file's pairs with their known preference, in one transaction."""
    pairs, report = read_pairs(path, fmt)
    if pairs:
        report.added, report.already_present = store.add_labelled_pairs(
            pairs, source=f"import:{Path(path).name}", labeller=f"dataset:{fmt}")
    return report


def import_gold(store: Store, path: str | Path, fmt: str) -> ImportReport:
    """Import a file's pairs as gold pairs (chosen is the known better reply), in one transaction.
    A pair the file, or the store's gold, contradicts is refused and reported with its line."""
    numbered, report = _read_numbered(path, fmt)
    report.what = "gold pairs"
    outcomes = store.add_gold_pairs([pair for _, pair in numbered], source=f"gold:{Path(path).name}")
    for (number, _), outcome in zip(numbered, outcomes):
        if outcome == "already gold":
            report.already_present += 1
        elif outcome in GOLD_TAKEN:
            report.added += 1
        else:
            report.skipped.append((number, outcome))
    report.skipped.sort()
    return report
