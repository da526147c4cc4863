"""Properties of the importer (hypothesis), on any input:

- reading a file never fails on a line: every non-blank line becomes a pair or is reported with
  its line number and a reason (only a broken gzip stream stops the read, with a ValueError);
- every pair read is one the store and the trainers can take: a prompt that ends with a user
  turn, roles a chat template knows, stripped non-empty texts, two different replies, valid Unicode;
- a pair reads back the same in every form the importer knows (prompt as text or messages,
  replies as text or messages, an implicit prompt, an HH dialogue, gzipped);
- an import stores exactly the distinct pairs read, a second import adds none, and the store's
  own export reads back as the same pairs.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from store import Store
from store.export import export
from store.importer import ROLES, import_file, read_pairs

# no example database left in the repository; each example overwrites the files of the one before
# in the test's tmp_path
FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
WITH_STORE = settings(FAST, max_examples=12)  # a fresh store per example costs ~0.2 s

# --- strategies ---------------------------------------------------------------------------------

# texts as people write them: any characters (hypothesis leaves out lone surrogates), with
# surrounding whitespace the importer strips; never an HH turn marker inside
HH_MARKERS = ("\n\nHuman: ", "\n\nAssistant: ")
text = st.text(min_size=1, max_size=40).filter(lambda t: t.strip())
spaced = (st.tuples(st.sampled_from(["", " ", "\n", "\t "]), text, st.sampled_from(["", " ", "\n"])).map("".join)
          .filter(lambda t: not any(m in t for m in HH_MARKERS)))


@st.composite
def pairs(draw, roles=ROLES):
    """(prompt messages, chosen, rejected) as the file holds them (unstripped), ending with a user turn."""
    turns = draw(st.lists(st.tuples(st.sampled_from(roles), spaced), max_size=4))
    prompt = [{"role": r, "content": c} for r, c in turns] + [{"role": "user", "content": draw(spaced)}]
    chosen, rejected = draw(spaced), draw(spaced)
    assume(chosen.strip() != rejected.strip())
    return prompt, chosen, rejected


def stripped(prompt, chosen, rejected):
    return [{"role": m["role"], "content": m["content"].strip()} for m in prompt], chosen.strip(), rejected.strip()


def jsonl_row(form: str, prompt, chosen, rejected) -> dict:
    def reply(t):
        return [{"role": "assistant", "content": t}]

    if form == "messages":
        return {"prompt": prompt, "chosen": reply(chosen), "rejected": reply(rejected)}
    if form == "text replies":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if form == "implicit prompt":
        return {"chosen": prompt + reply(chosen), "rejected": prompt + reply(rejected)}
    assert form == "text prompt" and len(prompt) == 1
    return {"prompt": prompt[0]["content"], "chosen": chosen, "rejected": rejected}


def hh_row(prompt, chosen, rejected) -> dict:
    speaker = {"user": "Human", "assistant": "Assistant"}

    def dialogue(reply):
        return "".join(f"\n\n{speaker[m['role']]}: {m['content']}" for m in prompt) + f"\n\nAssistant: {reply}"

    return {"chosen": dialogue(chosen), "rejected": dialogue(rejected)}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10)
messages_ish = st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                        st.sampled_from(ROLES + ("tool", "")) | json_values, max_size=3), max_size=3)
field = st.sampled_from(["prompt", "chosen", "rejected"])
row_ish = st.dictionaries(field, spaced | messages_ish | json_values, max_size=3)
hh_ish = st.dictionaries(st.sampled_from(["chosen", "rejected"]),
                         st.lists(st.sampled_from(["\n\nHuman: ", "\n\nAssistant: ", "hi", " ", "\n"]), max_size=6)
                         .map("".join) | json_values, max_size=2)

# one line of a file: a good row, a plausible but broken one, any JSON value, or any bytes
line = st.one_of(
    pairs().map(lambda p: json.dumps(jsonl_row("messages", *p)).encode()),
    pairs(roles=("user", "assistant")).map(lambda p: json.dumps(hh_row(*p)).encode()),
    row_ish.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    hh_ish.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=30),
    st.sampled_from([b"", b"  ", b"[" * 3000, b"1" * 5000, b'{"prompt": "\\ud800 q", "chosen": "a", "rejected": "b"}',
                     b'{"prompt": NaN}', b"\xef\xbb\xbf{}", b"\xff\xfe"]),
)
files = st.lists(line, max_size=8).map(lambda lines: b"\n".join(lines) + b"\n")


def write(directory: Path, data: bytes, name: str = "pairs.jsonl") -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def is_good(pair) -> bool:
    texts = [m["content"] for m in pair.messages] + [pair.chosen, pair.rejected]
    return (bool(pair.messages) and pair.messages[-1]["role"] == "user"
            and all(m["role"] in ROLES and set(m) == {"role", "content"} for m in pair.messages)
            and all(t and t == t.strip() for t in texts) and pair.chosen != pair.rejected
            and all(t.encode("utf-8") for t in texts))


# --- properties ---------------------------------------------------------------------------------

@FAST
@given(data=files, fmt=st.sampled_from(["jsonl", "hh"]), gz=st.booleans())
def test_every_line_is_a_pair_or_a_reported_skip(tmp_path, data, fmt, gz):
    assume(gz or data[:2] != b"\x1f\x8b")  # a plain file that starts like gzip is read as gzip
    path = write(tmp_path, gzip.compress(data) if gz else data)
    pairs_read, report = read_pairs(path, fmt)
    lines = data.splitlines()
    assert report.lines == len(lines)
    numbers = [n for n, _ in report.skipped]
    assert numbers == sorted(set(numbers)) and all(1 <= n <= len(lines) and lines[n - 1].strip() for n in numbers)
    assert all(isinstance(why, str) and why for _, why in report.skipped)
    assert len(pairs_read) + len(numbers) == sum(1 for x in lines if x.strip())
    assert all(is_good(p) for p in pairs_read)
    json.dumps(report.to_dict())  # the --report file can always be written


@FAST
@given(data=files)
def test_a_broken_gzip_stream_is_the_one_error(tmp_path, data):
    whole = gzip.compress(data)
    path = write(tmp_path, whole[: max(2, len(whole) // 2)], "broken.jsonl.gz")
    try:
        read_pairs(path, "jsonl")
    except ValueError as e:
        assert "broken gzip" in str(e)


@FAST
@given(pair=pairs(), form=st.sampled_from(["messages", "text replies", "implicit prompt", "text prompt", "hh"]),
       ascii_only=st.booleans(), gz=st.booleans())
def test_a_pair_reads_back_the_same_in_every_form(tmp_path, pair, form, ascii_only, gz):
    prompt, chosen, rejected = pair
    if form == "text prompt":
        prompt = prompt[-1:]
    if form == "hh":
        assume(all(m["role"] in ("user", "assistant") for m in prompt))
        row, fmt = hh_row(prompt, chosen, rejected), "hh"
    else:
        row, fmt = jsonl_row(form, prompt, chosen, rejected), "jsonl"
    data = (json.dumps(row, ensure_ascii=ascii_only) + "\n").encode()
    read, report = read_pairs(write(tmp_path, gzip.compress(data) if gz else data), fmt)
    assert report.skipped == []
    assert [(p.messages, p.chosen, p.rejected) for p in read] == [stripped(prompt, chosen, rejected)]


@FAST
@given(pair=pairs(), padded=st.booleans())
def test_the_forms_of_one_pair_are_the_same_pair(tmp_path, pair, padded):
    prompt, chosen, rejected = pair
    if padded:  # whitespace around the texts changes nothing
        prompt = [{**m, "content": f" {m['content']}\n"} for m in prompt]
        chosen, rejected = f"\t{chosen}", f"{rejected}  "
    forms = ["messages", "text replies", "implicit prompt"]
    data = "".join(json.dumps(jsonl_row(f, prompt, chosen, rejected)) + "\n" for f in forms).encode()
    read, _ = read_pairs(write(tmp_path, data), "jsonl")
    assert len(read) == 3 and len({p.uid for p in read}) == 1


@WITH_STORE
@given(data=files)
def test_an_import_stores_each_distinct_pair_once_and_its_export_reads_back(tmp_path, data):
    assume(data[:2] != b"\x1f\x8b")
    path = write(tmp_path, data)
    read, _ = read_pairs(path, "jsonl")
    with Store(":memory:") as store:
        report = import_file(store, path, "jsonl")
        distinct = {p.uid for p in read}
        assert (report.added, report.added + report.already_present) == (len(distinct), len(read))
        assert store.counts()["pairs"] == len(distinct)
        again = import_file(store, path, "jsonl")
        assert (again.added, again.already_present) == (0, len(read))

        exported = path.with_name("export.jsonl")
        export(store, "pairs", exported, "jsonl", heldout_share=0.5)
        back, back_report = read_pairs(exported, "jsonl")
        assert back_report.skipped == []
        assert {p.uid for p in back} == distinct
