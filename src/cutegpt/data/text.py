"""Raw-text corpora (.txt / JSON Lines), read the same way by `train pt` and `vocab`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from cutegpt.errors import CuteGPTError

SUFFIXES = (".txt", ".jsonl", ".json")


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, folders expanded to the .txt/.jsonl files inside them (sorted)."""
    files: list[Path] = []
    for p in map(lambda x: Path(x).expanduser(), paths):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise CuteGPTError(f"text file {p} does not exist.")
    if not files:
        raise CuteGPTError(f"no .txt or .jsonl files in {', '.join(map(str, paths))}.")
    return files


def read_documents(paths: Sequence[str | Path], text_field: str = "text", txt_per_line: bool = False) -> Iterator[str]:
    """Documents, streamed: a JSON Lines record's `text_field`, or a .txt file (or each of its lines).

    `txt_per_line=False` keeps a .txt file whole (a book, an article: pre-training
    text); True makes each non-empty line a document (one sentence or question a
    line, as tokenizer corpora usually are). Whitespace-only documents are skipped.
    """
    for f in corpus_files(paths):
        try:
            with open(f, encoding="utf-8") as fh:
                if f.suffix in (".jsonl", ".json"):
                    yield from _json_lines(f, fh, text_field)
                elif txt_per_line:
                    yield from (line.rstrip("\r\n") for line in fh if line.strip())
                else:
                    text = fh.read()
                    if text.strip():
                        yield text
        except UnicodeDecodeError as e:
            raise CuteGPTError(f"{f}: not UTF-8 text (byte {e.start}).") from None


def _json_lines(path: Path, lines: Iterator[str], field: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CuteGPTError(f"{path}, line {n} is not valid JSON.") from None
        except RecursionError:
            raise CuteGPTError(f"{path}, line {n} is nested too deeply to read.") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise CuteGPTError(f"{path}, line {n} is not valid JSON ({str(e).splitlines()[0][:100]}).") from None
        if not isinstance(record, dict) or field not in record:
            raise CuteGPTError(f"{path}, line {n} has no '{field}' field (set --text-field to the field that holds the text).")
        value = record[field]
        if not isinstance(value, str):
            raise CuteGPTError(f"{path}, line {n}: field '{field}' is not a string.")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise CuteGPTError(f"{path}, line {n}: field '{field}' holds a lone surrogate ({value[e.start]!r}), which is not valid Unicode text.") from None
        if value.strip():
            yield value
