"""SFT data: prompts x and annotated responses y from a file or a built-in task, strictly validated.

    tspin-ray validate-data --config jobs/demo-cpu.yaml      # or: pytest tests/unit/data/test_data.py -q

`read_examples(path, cfg)` reads JSONL, Parquet, CSV or a directory saved by HF `datasets` into `Example`s
plus a `DataReport`. Every bad row gets a one-line problem "FILE:LINE: FIELD: problem" (Parquet and HF
datasets have no lines and say "FILE:row N: ..."). `on_bad_rows: error` raises the first as `UserError`;
`skip` counts them per reason and fails only above `max_bad_fraction`. `load_splits(cfg)` adds the eval
hold-out and the seeded, nested `fraction` / `limit` subsets. Nothing is written while loading.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tspin_ray.config.schema import DataConfig
from tspin_ray.data.tasks import TASKS
from tspin_ray.errors import UserError

MAX_PROBLEMS = 10  # problems kept in a DataReport; the counts cover the rest
_BOM = b"\xef\xbb\xbf"
TokenCounter = Callable[[str, str, str], int]  # (prompt, system, history) -> tokens of the rendered prompt
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Example:
    prompt_id: str
    prompt: str
    response: str
    system: str = ""  # a system turn of chat data, rendered before the prompt by the chat template
    history: str = ""  # earlier turns (data.turns: last) as a JSON list of {role, content}, after `system`


@dataclass(frozen=True)
class DataReport:
    source: str  # file path or "task:<name>"
    rows: int  # rows read (blank lines and the CSV header are not rows)
    kept: int
    skipped: dict[str, int]  # reason -> count (only with on_bad_rows: skip)
    problems: tuple[str, ...]  # the first MAX_PROBLEMS problems, "FILE:LINE: FIELD: problem"


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    eval: list[Example]
    reports: tuple[DataReport, ...]


class _BadRow(Exception):
    """One bad row. `reason` is its DataReport.skipped key; `field` is the column, or "row" for the whole row."""

    def __init__(self, reason: str, field: str, message: str):
        super().__init__(message)
        self.reason, self.field = reason, field


@dataclass(frozen=True)
class _Columns:
    prompt: str
    response: str
    messages: str | None
    id: str | None
    auto: bool = False  # messages/id not configured: taken from UltraChat's layout when the data has it

    @property
    def needed(self) -> list[str]:
        cols = [self.messages] if self.messages else [self.prompt, self.response]
        return cols + ([self.id] if self.id else [])

    def resolve(self, names: Iterable[str]) -> _Columns:
        """UltraChat rows (prompt, prompt_id, messages) need no keys set: `messages` when prompt and response
        are not both there, `prompt_id` as the id when there is one."""
        if not self.auto:
            return self
        names = set(names)
        both = self.prompt in names and self.response in names
        messages = self.messages or ("messages" if not both and "messages" in names else None)
        return _Columns(self.prompt, self.response, messages, self.id or ("prompt_id" if "prompt_id" in names else None))


def _kind(value: Any) -> str:
    """The JSON name of a value's type: users wrote JSON, not Python."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _get(record: dict, name: str) -> Any:
    if record.get(name) is None:
        have = ", ".join(map(str, record)) or "none"
        raise _BadRow("missing_field", name, f"missing (the row has: {have})" if name not in record else "is null")
    return record[name]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _BadRow("wrong_type", field, f"expected a string, got {_kind(value)} {str(value)[:40]!r}")
    try:
        value.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates that no tokenizer or writer accepts
    except UnicodeEncodeError:
        raise _BadRow("invalid_utf8", field, "contains a lone surrogate escape, not valid Unicode") from None
    return value


def _from_messages(turns: Any, field: str, which: str = "first") -> tuple[str, str, str, str]:
    """(prompt, response, system, history). first: the first user turn is the prompt and the first
    assistant turn after it the response (how SPIN reads UltraChat); a system turn before the prompt stays
    with it. last: the final assistant turn is the response, the user turn right before it the prompt, and
    every turn before that the history (a JSON list; a leading system turn stays `system`)."""
    if not isinstance(turns, list | tuple):
        raise _BadRow("wrong_type", field, f"expected a list of {{role, content}} turns, got {_kind(turns)}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise _BadRow("wrong_type", f"{field}[{i}]", f"expected {{role, content}}, got {str(turn)[:40]!r}")
    if which == "last":
        return _last_exchange(list(turns), field)
    prompt, system = None, ""
    for i, turn in enumerate(turns):
        if prompt is None and turn["role"] == "system":
            system = _text(turn.get("content"), f"{field}[{i}].content")
        elif prompt is None and turn["role"] == "user":
            prompt = _text(turn.get("content"), f"{field}[{i}].content")
        elif prompt is not None and turn["role"] == "assistant":
            return prompt, _text(turn.get("content"), f"{field}[{i}].content"), system, ""
    if prompt is None:
        raise _BadRow("no_user_turn", field, "no user turn")
    raise _BadRow("no_assistant_turn", field, "no assistant turn after the first user turn")


def _last_exchange(turns: list[dict], field: str) -> tuple[str, str, str, str]:
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise _BadRow("no_assistant_turn", field, "no assistant turn")
    if last == 0 or turns[last - 1]["role"] != "user":
        raise _BadRow("no_user_turn", f"{field}[{last}]", "the final assistant turn does not follow a user turn")
    texts = [_text(t.get("content"), f"{field}[{i}].content") for i, t in enumerate(turns[:last + 1])]
    start = 1 if turns[0]["role"] == "system" else 0
    history = [{"role": t["role"], "content": c} for t, c in zip(turns[start:last - 1], texts[start:last - 1], strict=True)]
    return texts[last - 1], texts[last], texts[0] if start else "", json.dumps(history) if history else ""


def _example(record: dict, cols: _Columns, cfg: DataConfig, count_tokens: TokenCounter | None) -> Example:
    cols, system, history = cols.resolve(k for k, v in record.items() if v is not None), "", ""
    if cols.messages:
        pfield = rfield = cols.messages
        prompt, response, system, history = _from_messages(_get(record, cols.messages), cols.messages, cfg.turns)
    else:
        pfield, rfield = cols.prompt, cols.response
        try:
            prompt, response = _text(_get(record, pfield), pfield), _text(_get(record, rfield), rfield)
        except _BadRow as bad:
            if bad.reason != "missing_field" or (pfield in record and rfield in record):
                raise
            raise _BadRow(bad.reason, bad.field, f"{bad}; set data.prompt_column and data.response_column, "
                                                 "or data.messages_column for chat rows") from None
    if not prompt.strip():
        raise _BadRow("empty_prompt", pfield, "empty or whitespace only")
    if not response.strip():
        raise _BadRow("empty_response", rfield, "empty or whitespace only")
    if cols.id:
        raw = _get(record, cols.id)
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise _BadRow("wrong_type", cols.id, f"expected a string or integer id, got {_kind(raw)}")
        prompt_id = _text(str(raw), cols.id)
        if not prompt_id.strip():
            raise _BadRow("empty_id", cols.id, "empty or whitespace only")
    else:
        # A hash of the text, not the row number: stable when the file is reordered, across runs and machines.
        # Earlier turns count too (two conversations may end with the same question); none: as before.
        prompt_id = hashlib.sha256((prompt + (f"\0{history}" if history else "")).encode("utf-8")).hexdigest()[:16]
    try:
        n = count_tokens(prompt, system, history) if count_tokens else len(prompt)
    except Exception as e:  # the chat template refuses these turns (jinja2's TemplateError, raised by it)
        if not type(e).__module__.startswith("jinja2"):
            raise
        raise _BadRow("template_refused", pfield, f"the chat template refuses this conversation: {e}") from None
    if n > cfg.max_prompt_tokens:
        unit = "tokens" if count_tokens else "characters (no tokenizer given)"
        raise _BadRow("prompt_too_long", pfield, f"{n} {unit} > max_prompt_tokens {cfg.max_prompt_tokens}")
    return Example(prompt_id, prompt, response, system, history)


def _collect(source: str, rows: Iterable[tuple[int, dict | _BadRow]], cols: _Columns, cfg: DataConfig,
             count_tokens: TokenCounter | None, unit: str) -> tuple[list[Example], DataReport]:
    """Validate rows, applying the on_bad_rows policy. `unit` says whether row numbers are file lines."""
    examples: list[Example] = []
    seen: dict[str, int] = {}  # prompt_id -> where it was first kept, to name the earlier row of a duplicate
    skipped: Counter[str] = Counter()
    problems: list[str] = []
    n_rows = 0
    for n, record in rows:
        n_rows += 1
        try:
            if isinstance(record, _BadRow):
                raise record
            ex = _example(record, cols, cfg, count_tokens)
            first = seen.get(ex.prompt_id)
            if first is not None:
                what = f"{cols.id} {ex.prompt_id!r}" if cols.id else f"derived id {ex.prompt_id} (same prompt text)"
                raise _BadRow("duplicate_id", cols.id or "prompt_id", f"duplicate {what}, first at {unit} {first}")
        except _BadRow as bad:
            message = f"{source}:{n if unit == 'line' else f'row {n}'}: {bad.field}: {bad}"
            if cfg.on_bad_rows == "error":
                raise UserError(message) from None
            skipped[bad.reason] += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(message)
            continue
        seen[ex.prompt_id] = n
        examples.append(ex)
    if n_rows == 0:
        raise UserError(f"{source}: no rows")
    n_bad = sum(skipped.values())
    if n_bad / n_rows > cfg.max_bad_fraction or not examples:
        reason, count = skipped.most_common(1)[0]
        raise UserError(f"{source}: {n_bad} of {n_rows} rows are bad ({n_bad / n_rows:.1%} > max_bad_fraction "
                        f"{cfg.max_bad_fraction:.1%}); most common: {reason} ({count}); first: {problems[0]}")
    return examples, DataReport(source, n_rows, len(examples), dict(skipped), tuple(problems))


def _lines(path: Path) -> Iterator[tuple[int, str, _BadRow | None]]:
    """Physical lines decoded one at a time, so a bad byte spoils its own line and not the whole file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.removeprefix(_BOM) if n == 1 else raw  # a BOM (Excel, Notepad) is accepted, not an error
            try:
                yield n, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                bad = _BadRow("invalid_utf8", "row", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
                yield n, raw.decode("utf-8", errors="replace"), bad


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | _BadRow]]:
    for n, text, bad in _lines(path):
        if not text.strip():
            continue  # blank lines (a trailing newline, a gap) are not rows
        if bad:
            yield n, bad
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            hint = "; truncated line?" if e.pos >= len(text.rstrip()) else ""
            if n == 1 and text.lstrip().startswith("["):
                hint = "; this looks like one JSON array, but JSON Lines needs one object per line"
            yield n, _BadRow("invalid_json", "row", f"invalid JSON ({e.msg} at column {e.colno}{hint})")
            continue
        yield n, record if isinstance(record, dict) else _BadRow(
            "not_object", "row", f"expected a JSON object, got {_kind(record)}")


def _require(source: Path, names: list[str], cols: _Columns) -> _Columns:
    """The columns this file is read by; a column absent from the whole file is one file-level error,
    not one error per row."""
    cols = cols.resolve(names)
    for col in cols.needed:
        if col not in names:
            raise UserError(f"{source}: no column {col!r} (columns: {', '.join(map(str, names))}); "
                            "set data.prompt_column / response_column / messages_column / id_column")
    return cols


def _csv_rows(path: Path, cols: _Columns) -> Iterator[tuple[int, dict | _BadRow]]:
    # The csv module rather than pandas/pyarrow: it tracks file line numbers (also across quoted newlines)
    # and can be fed lines decoded one by one, so a non-UTF-8 byte is pinned to its line.
    bad_lines: dict[int, _BadRow] = {}

    def decoded() -> Iterator[str]:
        for n, text, bad in _lines(path):
            if bad:
                bad_lines[n] = bad
            yield text

    reader = csv.reader(decoded())
    try:
        header = next(reader, None)
        if header is None:
            return
        if 1 in bad_lines:
            raise UserError(f"{path}:1: header: {bad_lines[1]}")
        cols = _require(path, header, cols)
        start = reader.line_num + 1
        for record in reader:
            first, start = start, reader.line_num + 1
            if not record:
                continue  # blank line
            bad = next((i for i in range(first, start) if i in bad_lines), None)
            if bad is not None:
                yield bad, bad_lines[bad]
            elif len(record) != len(header):
                yield first, _BadRow("wrong_field_count", "row", f"{len(record)} fields but the header has "
                                     f"{len(header)} (an unquoted comma or quote?)")
            else:
                yield first, dict(zip(header, record, strict=True))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: row: invalid CSV ({e})") from None


def _arrow_rows(source: Path, batches: Iterable[Any]) -> Iterator[tuple[int, dict | _BadRow]]:
    n = 0
    try:
        for batch in batches:
            for record in batch.to_pylist():
                n += 1
                yield n, record
    except pa.ArrowException as e:
        raise UserError(f"{source}:row {n + 1}: row: cannot read ({e})") from None


def _parquet_rows(path: Path, cols: _Columns) -> Iterator[tuple[int, dict | _BadRow]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    cols = _require(path, pf.schema_arrow.names, cols)
    return _arrow_rows(path, pf.iter_batches(batch_size=4096, columns=cols.needed))


def _hf_rows(path: Path, cols: _Columns, split: str) -> Iterator[tuple[int, dict | _BadRow]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))  # memory-maps the Arrow files; writes nothing
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise UserError(f"{path}: cannot load the saved HF dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); set data.split")
        ds = ds[split]
    cols = _require(path, ds.column_names, cols)
    return _arrow_rows(path, ds.select_columns(cols.needed).with_format("arrow").iter(batch_size=4096))


def _repo_rows(path: Path, cols: _Columns, split: str) -> Iterator[tuple[int, dict | _BadRow]]:
    """A dataset repository's snapshot (a hub id resolved from the HF cache): its data files by split, as
    datasets reads them from the hub (`data/train_sft-00000-of-00003.parquet` is split train_sft)."""
    import datasets

    try:
        ds = datasets.load_dataset(str(path), split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise UserError(f"{path}: no split {split!r} ({str(e).split('. ', 1)[-1].rstrip('.')}); set data.split") from None
        raise UserError(f"{path}: cannot load the dataset repository ({e})") from None
    cols = _require(path, ds.column_names, cols)
    return _arrow_rows(path, ds.select_columns(cols.needed).with_format("arrow").iter(batch_size=4096))


def _detect(path: Path, fmt: str) -> str:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        if fmt not in ("auto", "hf"):
            raise UserError(f"{path} is a directory, not a {fmt} file")
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        if any(f.suffix.lower() in _EXTENSIONS for f in path.rglob("*") if f.is_file()):
            return "repo"
        raise UserError(f"{path} is a directory but neither a dataset saved by HF datasets' save_to_disk (no "
                        "dataset_info.json or dataset_dict.json) nor a dataset repository with data files; give a "
                        ".jsonl, .parquet or .csv file")
    if fmt == "hf":
        raise UserError(f"{path} is a file; format hf expects a directory written by datasets' save_to_disk")
    if fmt == "auto" and path.suffix.lower() not in _EXTENSIONS:
        raise UserError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                        "use .jsonl, .parquet or .csv, or set data.format")
    return _EXTENSIONS[path.suffix.lower()] if fmt == "auto" else fmt


def read_examples(path: str | os.PathLike, cfg: DataConfig,
                  count_tokens: TokenCounter | None = None) -> tuple[list[Example], DataReport]:
    """Read and validate one file or HF dataset directory; raises UserError per `cfg.on_bad_rows`."""
    p = Path(path)
    fmt = _detect(p, cfg.format)
    cols = _Columns(cfg.prompt_column, cfg.response_column, cfg.messages_column, cfg.id_column,
                    auto=True)
    readers = {"jsonl": lambda: _jsonl_rows(p), "csv": lambda: _csv_rows(p, cols),
               "parquet": lambda: _parquet_rows(p, cols), "hf": lambda: _hf_rows(p, cols, cfg.split), "repo": lambda: _repo_rows(p, cols, cfg.split)}
    try:
        rows = readers[fmt]()
        return _collect(str(path), rows, cols, cfg, count_tokens, "line" if fmt in ("jsonl", "csv") else "row")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def _ranked(examples: list[Example], seed: int, salt: str) -> list[Example]:
    """A seeded shuffle keyed by prompt_id, not by position: reordering the file changes nothing, and
    the first k of the order are a subset of the first k' > k (which makes fractions nested)."""
    return sorted(examples, key=lambda e: hashlib.sha256(f"{salt}:{seed}:{e.prompt_id}".encode()).digest())


def load_splits(cfg: DataConfig, count_tokens: TokenCounter | None = None) -> Splits:
    """Train and eval examples, both in a seeded order that depends only on ids. Same cfg -> same lists."""
    for key, name in (("task", cfg.task), ("checker", cfg.checker)):
        if name is not None and name not in TASKS:
            raise UserError(f"unknown data.{key} {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    if cfg.task is not None:
        rows = enumerate(TASKS[cfg.task].make(cfg.task_size, cfg.seed), 1)
        task_cols = _Columns("prompt", "response", None, "id")
        pool, report = _collect(f"task:{cfg.task}", rows, task_cols, cfg, count_tokens, "row")
    else:
        pool, report = read_examples(cfg.path, cfg, count_tokens)
    reports = [report]
    if cfg.eval_path:
        held_out, eval_report = read_examples(cfg.eval_path, cfg, count_tokens)
        reports.append(eval_report)
        held_out = _ranked(held_out, cfg.seed, "eval")
    else:
        if cfg.eval_size >= len(pool):
            raise UserError(f"{report.source}: data.eval_size {cfg.eval_size} leaves no training rows "
                            f"({len(pool)} valid rows); lower eval_size or set data.eval_path")
        ranked = _ranked(pool, cfg.seed, "eval")
        held_out, pool = ranked[:cfg.eval_size], ranked[cfg.eval_size:]
    # The hold-out does not depend on fraction/limit, so every subset is evaluated on the same rows.
    train = _ranked(pool, cfg.seed, "train")
    train = train[:max(1, round(len(train) * cfg.fraction))][:cfg.limit]
    return Splits(train, held_out, tuple(reports))


def format_report(splits_or_reports: Splits | DataReport | Iterable[DataReport]) -> str:
    """Human-readable summary, as printed by `tspin-ray validate-data`."""
    s, lines = splits_or_reports, []
    reports = s.reports if isinstance(s, Splits) else (s,) if isinstance(s, DataReport) else s
    for r in reports:
        n_bad = sum(r.skipped.values())
        head = f"{r.source}: {r.rows} rows, {r.kept} kept"
        if n_bad:
            head += f", {n_bad} skipped (" + ", ".join(f"{k} {v}" for k, v in Counter(r.skipped).most_common()) + ")"
        lines += [head] + [f"  {p}" for p in r.problems]
        if n_bad > len(r.problems):
            lines.append(f"  ... and {n_bad - len(r.problems)} more")
    if isinstance(s, Splits):
        lines.append(f"splits: {len(s.train)} train, {len(s.eval)} eval")
    return "\n".join(lines)


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> None:
    """Write prompt_id/prompt/response lines atomically: a temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for ex in examples:
                row = {"prompt_id": ex.prompt_id, "prompt": ex.prompt, "response": ex.response}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data is not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
