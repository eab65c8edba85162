"""Reference log-probs of every pair's chosen and rejected response, computed once (Stage 3) and cached.

`data/ref_logps.safetensors` (keys `<split>/chosen`, `<split>/rejected`, in row order) lets Stage 5 train without
running the reference. The cache's metadata holds a hash of the pair ids, the truncation length and the reference
model's hash: a cache that no longer matches its pairs or model is refused (`StaleRefLogps`). The file is
byte-deterministic (io.write_safetensors), so rerunning Stage 3 on the same inputs leaves Stages 5-7 up to date.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from dpoflow.core.batching import (
    ChosenRejected,
    collate_pairs,
    encode_pair,
    pad_id,
    split_pairs,
)
from dpoflow.core.logprobs import completion_logprobs
from dpoflow.runtime import io
from dpoflow.runtime.errors import UserError

REF_LOGPS_FORMAT = "dpoflow-ref-logps-v1"


class StaleRefLogps(UserError, ValueError):
    """The reference log-prob cache does not belong to these pairs / this reference model / this max_len."""


def pairs_fingerprint(pairs: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the pair ids in row order: changes when any pair, or the order, changes."""
    return hashlib.sha256("\n".join(str(p["id"]) for p in pairs).encode("utf-8")).hexdigest()


def compute_ref_logps(
    reference: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    max_len: int,
    batch_size: int,
    desc: str = "ref logps",
) -> ChosenRejected:
    """Summed log-probs of each pair's chosen and rejected completion under `reference` (one forward for both),
    length-grouped batches, in row order: ChosenRejected([N] float32, [N] float32).

    Tokenized exactly as Stage 5 tokenizes (batching.encode_pair with the same max_len)."""
    n = len(pairs)
    chosen = np.zeros(n, dtype=np.float32)
    rejected = np.zeros(n, dtype=np.float32)
    if n == 0:
        return ChosenRejected(chosen, rejected)
    encoded = [encode_pair(tokenizer, pair, max_len) for pair in pairs]
    order = np.argsort([-e.max_length for e in encoded], kind="stable")
    pad = pad_id(tokenizer)
    with tqdm(total=n, desc=desc, unit="pair", dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = collate_pairs([encoded[i] for i in idx], pad)
            sums, _ = completion_logprobs(reference, batch)
            c, r = split_pairs(sums, len(idx))
            mx.eval(c, r)
            chosen[idx], rejected[idx] = np.asarray(c), np.asarray(r)
            bar.update(len(idx))
    return ChosenRejected(chosen, rejected)


def write_ref_logps(
    path: Path,
    logps: Mapping[str, ChosenRejected],
    pairs: Mapping[str, Sequence[Mapping[str, Any]]],
    max_len: int,
    reference_hash: str,
) -> Path:
    """Write {split: ChosenRejected} as `<split>/chosen`, `<split>/rejected` + staleness metadata."""
    arrays, meta = {}, {"format": REF_LOGPS_FORMAT, "max_len": str(max_len), "reference_hash": reference_hash}
    for split, values in logps.items():
        if not len(values.chosen) == len(values.rejected) == len(pairs[split]):
            raise ValueError(f"ref logps for {split!r}: lengths differ from the {len(pairs[split])} pairs")
        arrays[f"{split}/chosen"] = np.ascontiguousarray(values.chosen, dtype=np.float32)
        arrays[f"{split}/rejected"] = np.ascontiguousarray(values.rejected, dtype=np.float32)
        meta[f"{split}/ids_sha256"] = pairs_fingerprint(pairs[split])
        meta[f"{split}/n_pairs"] = str(len(pairs[split]))
    io.write_safetensors(path, arrays, metadata=meta)  # sorted header: the same logps give the same bytes
    return Path(path)


def read_ref_logps(
    path: Path,
    pairs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    max_len: int | None = None,
    reference_hash: str | None = None,
) -> dict[str, ChosenRejected]:
    """Read the cache for the given splits, refusing it (StaleRefLogps) if any split's pair ids, the max_len or
    the reference hash differ from what it was computed for."""
    path = Path(path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if meta.get("format") != REF_LOGPS_FORMAT:
            raise StaleRefLogps(f"{path}: not a dpoflow reference log-prob cache (format {meta.get('format')!r})")
        rerun = "rerun Stage 3 (dvc repro init)"
        if max_len is not None and meta.get("max_len") != str(max_len):
            raise StaleRefLogps(f"{path}: computed with max_len {meta.get('max_len')}, now {max_len}: {rerun}")
        if reference_hash is not None and meta.get("reference_hash") != reference_hash:
            raise StaleRefLogps(
                f"{path}: computed with another reference model "
                f"({str(meta.get('reference_hash'))[:12]} != {reference_hash[:12]}): {rerun}"
            )
        out = {}
        for split, rows in pairs.items():
            if f"{split}/chosen" not in keys:
                raise StaleRefLogps(f"{path}: no reference log-probs for split {split!r}: {rerun}")
            if meta.get(f"{split}/ids_sha256") != pairs_fingerprint(rows):
                raise StaleRefLogps(
                    f"{path}: the {split!r} pairs changed since the cache was computed "
                    f"({meta.get(f'{split}/n_pairs')} cached pairs, {len(rows)} now, "
                    f"different ids or order): {rerun}"
                )
            out[split] = ChosenRejected(f.get_tensor(f"{split}/chosen"), f.get_tensor(f"{split}/rejected"))
    return out
