"""SFT data loader: every bad-row kind names file, line and field; formats; splits. Fixtures live in tmp_path."""

from __future__ import annotations

import hashlib
import json
import random
import types

import pytest

from tspin_ray.config.schema import DataConfig
from tspin_ray.data.loading import (
    DataReport,
    Example,
    Splits,
    format_report,
    load_splits,
    read_examples,
    write_jsonl,
)
from tspin_ray.errors import UserError


def good(i: int) -> bytes:
    return json.dumps({"id": f"e{i}", "prompt": f"what is {i}+{i}?", "response": str(2 * i)}).encode()


def write(path, lines: list[bytes], end: bytes = b"\n"):
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


# (case, bad line, its line number among 5 good rows, config, reason, field, words in the message)
BAD_ROWS = [
    ("truncated-json", b'{"prompt": "what is 9", "resp', 3, {}, "invalid_json", "row", "truncated"),
    ("not-an-object", b'["what is 9", "18"]', 2, {}, "not_object", "row", "got array"),
    ("prompt-is-number", b'{"prompt": 42, "response": "x"}', 4, {}, "wrong_type", "prompt", "got number"),
    ("prompt-is-null", b'{"prompt": null, "response": "x"}', 4, {}, "missing_field", "prompt", "null"),
    ("missing-response", b'{"prompt": "p"}', 1, {}, "missing_field", "response", "the row has: prompt"),
    ("empty-response", b'{"prompt": "p", "response": ""}', 6, {}, "empty_response", "response", "empty"),
    ("blank-prompt", b'{"prompt": " \\t\\n", "response": "r"}', 2, {}, "empty_prompt", "prompt", "whitespace"),
    ("non-utf8", b'{"prompt": "caf\xe9", "response": "r"}', 3, {}, "invalid_utf8", "row", "byte 0xe9"),
    ("lone-surrogate", b'{"prompt": "a\\ud800", "response": "r"}', 3, {}, "invalid_utf8", "prompt", "surrogate"),
    ("duplicate-explicit-id", b'{"id": "e1", "prompt": "other", "response": "r"}', 4, {"id_column": "id"},
     "duplicate_id", "id", "first at line 2"),
    ("duplicate-prompt", good(0).replace(b'"e0"', b'"x"'), 3, {}, "duplicate_id", "prompt_id",
     "(same prompt text), first at line 1"),
    ("wrong-id-type", b'{"id": [1], "prompt": "p", "response": "r"}', 2, {"id_column": "id"}, "wrong_type", "id",
     "got array"),
    ("prompt-too-long", json.dumps({"prompt": "x" * 600, "response": "r"}).encode(), 5, {}, "prompt_too_long",
     "prompt", "600 characters (no tokenizer given) > max_prompt_tokens 512"),
    ("no-assistant-turn", b'{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}',
     2, {"messages_column": "messages"}, "no_assistant_turn", "messages", "no assistant turn"),
    ("no-user-turn", b'{"messages": [{"role": "system", "content": "s"}]}', 2, {"messages_column": "messages"},
     "no_user_turn", "messages", "no user turn"),
    ("turn-content-number", b'{"messages": [{"role": "user", "content": 3}]}', 2, {"messages_column": "messages"},
     "wrong_type", "messages[0].content", "got number"),
    ("last-turn-after-no-user", b'{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": '
     b'"a"}]}', 3, {"messages_column": "messages", "turns": "last"}, "no_user_turn", "messages[1]",
     "the final assistant turn does not follow a user turn"),
    ("last-turn-missing", b'{"messages": [{"role": "user", "content": "q"}]}', 2,
     {"messages_column": "messages", "turns": "last"}, "no_assistant_turn", "messages", "no assistant turn"),
]


def bad_file(tmp_path, bad: bytes, line: int, kw: dict):
    if "messages_column" in kw:
        rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                         {"role": "assistant", "content": f"a{i}"}]}).encode() for i in range(5)]
    else:
        rows = [good(i) for i in range(5)]
    rows.insert(line - 1, bad)
    return write(tmp_path / "data.jsonl", rows)


@pytest.mark.parametrize("case,bad,line,kw,reason,field,words", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_an_error_naming_file_line_and_field(tmp_path, case, bad, line, kw, reason, field, words):
    path = bad_file(tmp_path, bad, line, kw)
    with pytest.raises(UserError) as e:
        read_examples(path, cfg_for(path, **kw))
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: {field}: "), message
    assert words in message and "\n" not in message


@pytest.mark.parametrize("case,bad,line,kw,reason,field,words", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_skipped_and_counted(tmp_path, case, bad, line, kw, reason, field, words):
    path = bad_file(tmp_path, bad, line, kw)
    examples, report = read_examples(path, cfg_for(path, on_bad_rows="skip", max_bad_fraction=0.5, **kw))
    assert (report.rows, report.kept, report.skipped) == (6, 5, {reason: 1})
    assert len(examples) == 5 and report.problems[0].startswith(f"{path}:{line}: {field}: ")


def test_a_conversation_the_chat_template_refuses_is_a_bad_row(tmp_path):
    """Templates such as Mistral's raise on turns that do not alternate: a bad row, not a traceback."""
    from jinja2 import TemplateError

    def strict(prompt, system, history):
        if history and json.loads(history)[-1]["role"] == "user":
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
        return 3

    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"},
             {"role": "assistant", "content": "d"}]
    path = write(tmp_path / "chat.jsonl", [json.dumps({"messages": CONVERSATION}).encode(),
                                            json.dumps({"messages": turns}).encode()])
    with pytest.raises(UserError, match=r"chat.jsonl:2: messages: the chat template refuses this conversation: "
                                        r"Conversation roles must alternate"):
        read_examples(path, cfg_for(path, messages_column="messages", turns="last"), count_tokens=strict)
    examples, report = read_examples(path, cfg_for(path, messages_column="messages", turns="last", on_bad_rows="skip",
                                                   max_bad_fraction=0.5), count_tokens=strict)
    assert len(examples) == 1 and report.skipped == {"template_refused": 1}


def test_token_counter_is_used_and_named(tmp_path):
    path = write(tmp_path / "d.jsonl", [good(0), json.dumps({"prompt": "a b c d", "response": "r"}).encode()])
    with pytest.raises(UserError, match=r"d.jsonl:2: prompt: 4 tokens > max_prompt_tokens 3"):
        read_examples(path, cfg_for(path, max_prompt_tokens=3), count_tokens=lambda prompt, system, history: len(prompt.split()))


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good(0) + b"\r\n\r\n" + good(1) + b"\r\n\n")
    examples, report = read_examples(path, cfg_for(path))
    assert [e.prompt for e in examples] == ["what is 0+0?", "what is 1+1?"]
    assert (report.rows, report.kept, report.skipped) == (2, 2, {})


def test_derived_id_is_a_hash_of_the_prompt_and_id_column_is_a_string(tmp_path):
    path = write(tmp_path / "d.jsonl", [b'{"n": 7, "prompt": "p", "response": "r"}'])
    [ex], _ = read_examples(path, cfg_for(path))
    assert ex == Example(hashlib.sha256(b"p").hexdigest()[:16], "p", "r")
    [ex], _ = read_examples(path, cfg_for(path, id_column="n"))
    assert ex.prompt_id == "7"


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + good(0).decode() + "\n]\n")
    with pytest.raises(UserError, match=r"d.json:1: row: invalid JSON .*JSON Lines needs one object per line"):
        read_examples(path, cfg_for(path))


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"^{path}: no rows$"):
        read_examples(path, cfg_for(path))


def test_missing_path_directory_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path}/nope.jsonl does not exist$"):
        read_examples(tmp_path / "nope.jsonl", cfg_for(tmp_path / "nope.jsonl"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match=r"dir is a directory but neither a dataset saved by HF datasets. save_to_disk "
                                        r"\(no dataset_info.json or dataset_dict.json\) nor a dataset repository with data files"):
        read_examples(tmp_path / "dir", cfg_for(tmp_path / "dir"))
    with pytest.raises(UserError, match=r"dir is a directory, not a jsonl file"):
        read_examples(tmp_path / "dir", cfg_for(tmp_path / "dir", format="jsonl"))
    gz = write(tmp_path / "d.jsonl.gz", [good(0)])
    with pytest.raises(UserError, match=r"d.jsonl.gz: cannot tell the format from the extension '.gz'"):
        read_examples(gz, cfg_for(gz))
    txt = write(tmp_path / "d.txt", [good(0)])
    assert len(read_examples(txt, cfg_for(txt, format="jsonl"))[0]) == 1


def test_skip_threshold_names_file_count_fraction_and_top_reason(tmp_path):
    rows = [good(i) for i in range(7)] + [b"{", b'{"prompt": "p"}', b"{oops"]
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as e:
        read_examples(path, cfg_for(path, on_bad_rows="skip", max_bad_fraction=0.1))
    assert str(e.value).startswith(f"{path}: 3 of 10 rows are bad (30.0% > max_bad_fraction 10.0%); "
                                   "most common: invalid_json (2); first: ")
    _, report = read_examples(path, cfg_for(path, on_bad_rows="skip", max_bad_fraction=0.3))
    assert report.skipped == {"invalid_json": 2, "missing_field": 1}
    assert "d.jsonl: 10 rows, 7 kept, 3 skipped (invalid_json 2, missing_field 1)" in format_report(report)
    all_bad = write(tmp_path / "bad.jsonl", [b"{"])
    with pytest.raises(UserError, match="1 of 1 rows are bad"):
        read_examples(all_bad, cfg_for(all_bad, on_bad_rows="skip", max_bad_fraction=1.0))


def test_csv_happy_path_and_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfquestion,answer\r\nwhat is 1+1?,2\r\n"multi\nline, quoted",yes\r\n'
                     b"what is 2+2?,\r\n")
    kw = {"prompt_column": "question", "response_column": "answer"}
    with pytest.raises(UserError, match=rf"^{path}:5: answer: empty or whitespace only$"):
        read_examples(path, cfg_for(path, **kw))
    examples, report = read_examples(path, cfg_for(path, on_bad_rows="skip", max_bad_fraction=0.5, **kw))
    assert [(e.prompt, e.response) for e in examples] == [("what is 1+1?", "2"), ("multi\nline, quoted", "yes")]
    assert report.rows == 3


@pytest.mark.parametrize("body,line,field,words", [
    (b"p,r\na,b\nc,d,e\n", 3, "row", "3 fields but the header has 2"),
    (b"p,r\na,b\nc,d\n\xff,x\n", 4, "row", "not valid UTF-8"),
    (b"p,r\na,b\n123,456\n", None, None, None),  # CSV cells are text: a numeric prompt is fine
])
def test_csv_bad_rows(tmp_path, body, line, field, words):
    path = tmp_path / "d.csv"
    path.write_bytes(body)
    cfg = cfg_for(path, prompt_column="p", response_column="r")
    if line is None:
        assert read_examples(path, cfg)[0][-1].prompt == "123"
        return
    with pytest.raises(UserError, match=rf"^{path}:{line}: {field}: {words}"):
        read_examples(path, cfg)


def test_missing_column_is_one_file_level_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,a\nx,y\n")
    with pytest.raises(UserError, match=r"d.csv: no column 'prompt' \(columns: q, a\)"):
        read_examples(path, cfg_for(path))


def test_parquet_happy_path_and_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"uid": [10, 11, 12], "messages": [
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}],
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [{"role": "user", "content": "q2"}, {"role": "user", "content": "q2b"}, {"role": "assistant", "content": "a2"}],
    ]}), path)
    examples, report = read_examples(path, cfg_for(path, messages_column="messages", id_column="uid"))
    # the system turn stays with its prompt (rendered before it by the chat template)
    assert examples == [Example("10", "q0", "a0", "s"), Example("11", "q1", "a1"), Example("12", "q2", "a2")]
    assert (report.source, report.rows) == (str(path), 3)
    pq.write_table(pa.table({"prompt": ["a", None], "response": ["b", "c"]}), path)
    with pytest.raises(UserError, match=rf"^{path}:row 2: prompt: is null$"):
        read_examples(path, cfg_for(path))
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        read_examples(path, cfg_for(path))


ULTRACHAT = [  # the papers' dataset: prompt, prompt_id and the whole conversation, no response column
    {"prompt": "How do I sort letters?", "prompt_id": "a1f3", "messages": [
        {"role": "user", "content": "How do I sort letters?"}, {"role": "assistant", "content": "Alphabetically."},
        {"role": "user", "content": "And numbers?"}, {"role": "assistant", "content": "By value."}]},
    {"prompt": "What is 2+2?", "prompt_id": "b7c9", "messages": [
        {"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}]},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_ultrachat_rows_load_with_no_column_keys(tmp_path, fmt):
    import datasets

    path = tmp_path / {"jsonl": "u.jsonl", "parquet": "u.parquet", "hf": "u"}[fmt]
    ds = datasets.Dataset.from_list(ULTRACHAT)
    {"jsonl": lambda: path.write_text("".join(json.dumps(r) + "\n" for r in ULTRACHAT)),
     "parquet": lambda: ds.to_parquet(str(path)), "hf": lambda: ds.save_to_disk(str(path))}[fmt]()
    examples, _ = read_examples(path, cfg_for(path))
    # First turn only (as the papers), prompt_id as the id, the system turn kept with the prompt.
    assert examples == [Example("a1f3", "How do I sort letters?", "Alphabetically."),
                        Example("b7c9", "What is 2+2?", "4", "Answer with a number.")]


def test_rows_with_neither_layout_name_the_keys_to_set(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"question": "q", "answer": "a"}).encode()])
    with pytest.raises(UserError, match=r"d.jsonl:1: prompt: missing \(the row has: question, answer\); set "
                                        r"data.prompt_column and data.response_column, or data.messages_column"):
        read_examples(path, cfg_for(path))


def test_hf_dataset_dir(tmp_path):
    import datasets

    rows = {"prompt": ["p0", "p1"], "response": ["r0", "r1"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    examples, _ = read_examples(tmp_path / "ds", cfg_for(tmp_path / "ds"))
    assert [e.response for e in examples] == ["r0", "r1"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({"prompt": ["t"], "response": [""]})}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert len(read_examples(tmp_path / "dd", cfg_for(tmp_path / "dd"))[0]) == 2
    with pytest.raises(UserError, match=r"dd:row 1: response: empty"):
        read_examples(tmp_path / "dd", cfg_for(tmp_path / "dd", split="test"))
    with pytest.raises(UserError, match=r"no split 'dev' \(splits: train, test\)"):
        read_examples(tmp_path / "dd", cfg_for(tmp_path / "dd", split="dev"))


def many(tmp_path, n=100, name="d.jsonl"):
    return write(tmp_path / name, [good(i) for i in range(n)])


def test_eval_hold_out_is_disjoint_and_fraction_nested_and_deterministic(tmp_path):
    path = many(tmp_path)
    splits = {f: load_splits(cfg_for(path, eval_size=20, fraction=f, seed=3)) for f in (0.25, 0.5, 1.0)}
    full = splits[1.0]
    assert (len(full.train), len(full.eval)) == (80, 20)
    assert not {e.prompt_id for e in full.train} & {e.prompt_id for e in full.eval}
    assert all(s.eval == full.eval for s in splits.values())  # the hold-out ignores fraction
    ids = {f: {e.prompt_id for e in s.train} for f, s in splits.items()}
    assert len(ids[0.25]) == 20 and len(ids[0.5]) == 40 and ids[0.25] < ids[0.5] < ids[1.0]
    assert load_splits(cfg_for(path, eval_size=20, fraction=0.5, seed=3)) == splits[0.5]
    other = load_splits(cfg_for(path, eval_size=20, fraction=0.5, seed=4))
    assert {e.prompt_id for e in other.train} != ids[0.5]
    limited = load_splits(cfg_for(path, eval_size=20, fraction=0.5, limit=7, seed=3))
    assert limited.train == splits[0.5].train[:7]


def test_splits_do_not_depend_on_file_order(tmp_path):
    rows = [good(i) for i in range(50)]
    a = load_splits(cfg_for(write(tmp_path / "a.jsonl", rows), eval_size=10, fraction=0.5))
    random.Random(1).shuffle(rows)
    b = load_splits(cfg_for(write(tmp_path / "b.jsonl", rows), eval_size=10, fraction=0.5))
    assert (a.train, a.eval) == (b.train, b.eval)


def test_eval_path_and_eval_size_too_large(tmp_path):
    train, held = many(tmp_path, 30), write(tmp_path / "eval.jsonl", [good(i) for i in range(100, 105)])
    splits = load_splits(cfg_for(train, eval_path=str(held)))
    assert (len(splits.train), len(splits.eval), len(splits.reports)) == (30, 5, 2)
    assert format_report(splits).endswith("splits: 30 train, 5 eval")
    with pytest.raises(UserError, match="eval_size 30 leaves no training rows"):
        load_splits(cfg_for(train, eval_size=30))
    bad_eval = write(tmp_path / "bad_eval.jsonl", [good(0), b"{"])
    with pytest.raises(UserError, match=r"bad_eval.jsonl:2: row: invalid JSON"):
        load_splits(cfg_for(train, eval_path=str(bad_eval)))


def test_task_source(monkeypatch):
    def make(n, seed):
        return [{"id": f"t{seed}-{i}", "prompt": f"{i}+1=", "response": str(i + 1)} for i in range(n)]

    from tspin_ray.data import loading

    monkeypatch.setattr(loading, "TASKS", {"add": types.SimpleNamespace(make=make),
                                           "reverse": types.SimpleNamespace(make=make)})
    splits = load_splits(DataConfig(task="add", task_size=50, eval_size=10, seed=2))
    assert (len(splits.train), len(splits.eval)) == (40, 10)
    assert splits.reports == (DataReport("task:add", 50, 50, {}, ()),)
    assert all(e.prompt_id.startswith("t2-") for e in splits.train)
    with pytest.raises(UserError, match="unknown data.task 'mul'; valid tasks: add, reverse"):
        load_splits(DataConfig(task="mul"))
    with pytest.raises(UserError, match="unknown data.checker 'arith'; valid tasks: add, reverse"):
        load_splits(DataConfig(path="jobs/data/arithmetic.jsonl", checker="arith"))


def test_write_jsonl_round_trips_atomically(tmp_path):
    examples = [Example("a", "prompt é", "resp"), Example("b", "p\nq", "r")]
    out = tmp_path / "sub" / "out.jsonl"
    write_jsonl(examples, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]
    assert read_examples(out, cfg_for(out, id_column="prompt_id"))[0] == examples

    def boom():
        yield examples[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(boom(), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # old file intact, no temp left
    assert read_examples(out, cfg_for(out, id_column="prompt_id"))[0] == examples


def test_loading_writes_nothing(tmp_path):
    path = write(tmp_path / "d.jsonl", [good(0), b"{"])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError):
        load_splits(cfg_for(path, eval_size=0))
    load_splits(cfg_for(path, eval_size=0, on_bad_rows="skip", max_bad_fraction=0.5))
    assert sorted(tmp_path.rglob("*")) == before


def test_format_report_lists_problems_and_overflow(tmp_path):
    path = write(tmp_path / "d.jsonl", [good(i) for i in range(20)] + [b"{"] * 12)
    splits = load_splits(cfg_for(path, eval_size=5, on_bad_rows="skip", max_bad_fraction=0.5))
    assert isinstance(splits, Splits)
    text = format_report(splits)
    assert text.splitlines()[0] == f"{path}: 32 rows, 20 kept, 12 skipped (invalid_json 12)"
    assert f"  {path}:21: row: invalid JSON" in text and "  ... and 2 more" in text
    assert text.splitlines()[-1] == "splits: 15 train, 5 eval"


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And times 3?"},
                {"role": "assistant", "content": "12"}]


def test_turns_last_trains_the_final_answer_with_the_whole_conversation_as_prompt(tmp_path, family_ckpt):
    """turns: last -> y is the final assistant turn; system, earlier turns and the last question are the
    prompt, ids exactly as Llama-3's chat template renders the conversation (BOS once)."""
    from tspin_ray.models.checkpoints import load_format

    path = write(tmp_path / "chat.jsonl", [json.dumps({"messages": CONVERSATION}).encode(),
                                            json.dumps({"messages": CONVERSATION[:1] + CONVERSATION[3:]}).encode()])
    (first, _), _ = read_examples(path, cfg_for(path, messages_column="messages"))
    (last, other), _ = read_examples(path, cfg_for(path, messages_column="messages", turns="last"))
    assert (first.prompt, first.response, first.system, first.history) == ("What is 2+2?", "4", "Be brief.", "")
    assert (last.prompt, last.response, last.system) == ("And times 3?", "12", "Be brief.")
    assert json.loads(last.history) == CONVERSATION[1:3]
    assert (other.prompt, other.history) == ("And times 3?", "") and other.prompt_id != last.prompt_id
    fmt = load_format(family_ckpt("llama3", 0))
    tok = fmt.tokenizer
    prompt, y = fmt.example_ids(last.prompt, last.response, last.system, 512, 1024, last.history)
    head = tok(tok.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    assert prompt == head and prompt.count(tok.bos_token_id) == 1
    assert y == full[len(head):len(head) + len(y)] and y[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.decode(y[:-1]) == "12"
