"""Import: real HH rows, generic JSONL, and every kind of bad line, all or nothing."""

import gzip
import json

import pytest

from store.importer import BadRow, import_file, parse_hh, parse_jsonl, read_pairs


def test_hh_dialogue_is_split_into_prompt_turns_and_final_replies():
    pair = parse_hh({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: Sure.",
                     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: No."})
    assert pair.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Help me?"}]
    assert (pair.chosen, pair.rejected) == ("Sure.", "No.")


@pytest.mark.parametrize("row, reason", [
    ({"chosen": "\n\nHuman: A\n\nAssistant: x"}, "'rejected' is missing"),
    ({"chosen": "Hello", "rejected": "Hi"}, "not an HH dialogue"),
    ({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}, "differ before"),
    ({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A\n\nAssistant: x"}, "same as rejected"),
    ({"chosen": "\n\nHuman: A\n\nAssistant: ", "rejected": "\n\nHuman: A\n\nAssistant: y"}, "empty reply"),
])
def test_bad_hh_rows_say_why(row, reason):
    with pytest.raises(BadRow, match=reason):
        parse_hh(row)


def test_jsonl_accepts_strings_messages_and_implicit_prompts():
    a = parse_jsonl({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    b = parse_jsonl({"prompt": [{"role": "user", "content": "Q?"}],
                     "chosen": [{"role": "assistant", "content": "yes"}],
                     "rejected": [{"role": "assistant", "content": "no"}]})
    c = parse_jsonl({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
                     "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}]})
    assert a == b == c


def test_real_hh_sample_imports_whole(store, hh_sample):
    report = import_file(store, hh_sample, "hh")
    assert (report.lines, report.added, report.skipped) == (24, 24, [])
    counts = store.counts()
    assert (counts["pairs"], counts["prompts"], counts["responses"], counts["labels"]) == (24, 24, 48, 24)
    again = import_file(store, hh_sample, "hh")
    assert (again.added, again.already_present) == (0, 24)


def test_gzipped_file_imports_the_same(store, hh_sample, tmp_path):
    gz = tmp_path / "sample.jsonl.gz"
    gz.write_bytes(gzip.compress(hh_sample.read_bytes()))
    assert import_file(store, gz, "hh").added == 24


def test_bad_lines_are_skipped_and_reported_with_line_numbers(store, bad_rows):
    report = import_file(store, bad_rows, "jsonl")
    assert report.added == 2 and store.counts()["pairs"] == 2
    reasons = dict(report.skipped)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 8, 9]
    assert reasons[2].startswith("broken JSON")
    assert "'chosen' is missing" in reasons[3]
    assert "'chosen' is empty" in reasons[4]
    assert "same as rejected" in reasons[5]
    assert reasons[6] == "not a JSON object"
    assert "'prompt'" in reasons[8]
    assert reasons[9] == "not valid UTF-8"
    summary = report.summary()
    assert "9 lines, 2 pairs added" in summary and "line 9: not valid UTF-8" in summary


def test_an_import_that_fails_midway_leaves_nothing(store, hh_sample, monkeypatch):
    import store.database as database

    calls = {"n": 0}
    real_insert = database._insert

    def insert_then_fail(db, table, columns):
        calls["n"] += 1
        if table == "pairs":
            raise RuntimeError("disk full")
        real_insert(db, table, columns)

    monkeypatch.setattr(database, "_insert", insert_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        import_file(store, hh_sample, "hh")
    assert calls["n"] == 3  # prompts and responses were written, then rolled back
    counts = store.counts()
    assert counts["pairs"] == counts["prompts"] == counts["responses"] == counts["labels"] == 0


def test_broken_gzip_and_unknown_format_are_clear(tmp_path, hh_sample):
    broken = tmp_path / "x.jsonl.gz"
    whole = gzip.compress(hh_sample.read_bytes())
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="broken gzip"):
        read_pairs(broken, "hh")
    with pytest.raises(ValueError, match="unknown format"):
        read_pairs(broken, "csv")


def test_report_lists_every_skipped_line_as_json(store, bad_rows):
    report = import_file(store, bad_rows, "jsonl").to_dict()
    assert json.loads(json.dumps(report))["skipped"][0] == {"line": 2, "reason": report["skipped"][0]["reason"]}
