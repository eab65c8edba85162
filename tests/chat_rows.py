"""Chat messages and JSONL files written the way users' files look (also malformed ones)."""

from __future__ import annotations

import json
from pathlib import Path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def write_lines(path: Path, rows: list) -> Path:
    """Rows are dicts/lists (dumped as JSON) or raw str/bytes lines."""
    chunks = []
    for row in rows:
        if isinstance(row, bytes):
            chunks.append(row)
        elif isinstance(row, str):
            chunks.append(row.encode("utf-8"))
        else:
            chunks.append(json.dumps(row).encode("utf-8"))
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path
