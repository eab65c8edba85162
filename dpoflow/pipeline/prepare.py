"""Stage 0 (prepare_data): every split the pipeline reads, from the embedded task or from the user's files.

Both sources give the same six splits, so the stages after this one do not care where the data came from:

    sft_train, sft_val   Stage 1's SFT rows ({"prompt": [messages], "completion"}; embedded: task items)
    pref_prompts         the prompts Stage 2 samples from
    heldout              held-out prompts: KL prompts, held-out pairs, task accuracy
    eval                 Stage 7's win-rate prompts (and the embedded task's generation benchmark)
    rounds               Stage 6's on-policy prompts: the part of data.prompts Stage 2 does not use

data.source files: data.sft (and data.sft_val, else a seeded data.fractions.sft_val of it), data.prompts (split by
data.fractions into eval when data.eval_prompts is null, heldout, rounds, and the rest for Stage 2). Splits are taken
by a hash of the prompt (data.sources.split_rows), so every row of one prompt lands on one side; then a training row
whose prompt overlaps an evaluation prompt (the same n-gram test as Stage 2's decontamination) is quarantined with its
reason, as is any row the readers could not use: input rows = accepted + quarantined, per file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpoflow.data import tasks
from dpoflow.data.decontamination import EvalIndex
from dpoflow.data.reading import RowsLoad
from dpoflow.data.sources import load_prompts, load_sft_rows, split_rows
from dpoflow.runtime.errors import UserError
from dpoflow.runtime.params import SPLITS, Params

# Salt per split, so the held-out fractions are independent draws of the seed.
SPLIT_SALT = {"sft_val": 1, "eval": 2, "heldout": 3, "rounds": 4}


@dataclass
class PreparedData:
    splits: dict[str, list[dict]]  # every name of runtime.params.SPLITS
    quarantined: list[dict] = field(default_factory=list)
    inputs: dict[str, dict] = field(default_factory=dict)  # per input param: origin, fingerprint, row counts

    def metrics(self) -> dict:
        """Row counts only (numbers to compare); origins and fingerprints are in `inputs`."""
        out = {f"n_{name}": len(self.splits[name]) for name in SPLITS}
        out["n_quarantined"] = len(self.quarantined)
        for key, info in sorted(self.inputs.items()):
            name = key.split(".")[-1]
            out[f"{name}_rows_in"] = info["n_input"]
            out[f"{name}_rows_quarantined"] = info["n_quarantined"]
        return out


def embedded(p: Params) -> PreparedData:
    """The embedded task's seeded, disjoint splits (data.sizes, data.tasks)."""
    return PreparedData(tasks.build_splits(p.data.tasks or None, p.data.sizes, seed=p.seed))


def _split(rows: Sequence[dict], fraction: float, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    return split_rows(rows, fraction, seed * 1000 + SPLIT_SALT[name])


def _texts(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    fields = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(row.get("prompt") or [])]
    if not fields and row.get("completion"):
        fields = [("completion", row["completion"])]
    return fields


def _screen(rows: list[dict], index: EvalIndex, against: str) -> tuple[list[dict], list[dict]]:
    """(clean rows, quarantine rows of those whose prompt overlaps an evaluation prompt)."""
    clean, out = [], []
    for row in rows:
        hits = index.matches([(name, text) for name, text in _texts(row) if not name.startswith("completion")])
        if hits:
            out.append(
                {
                    "location": row.get("source", "?"),
                    "field": next(iter(hits.values())),
                    "reason": f"contaminated: overlaps {against} ({', '.join(hits)})",
                    "row": {"id": row.get("id")},
                }
            )
        else:
            clean.append(row)
    return clean, out


def from_files(p: Params) -> PreparedData:
    """The user's files (data.sft, data.sft_val, data.prompts, data.eval_prompts) to the six splits."""
    d, seed = p.data, p.seed
    loads: dict[str, RowsLoad] = {"data.sft": load_sft_rows(d.sft)}
    if d.sft_val:
        loads["data.sft_val"] = load_sft_rows(d.sft_val)
        sft_train, sft_val = loads["data.sft"].rows, loads["data.sft_val"].rows
    else:
        sft_train, sft_val = _split(loads["data.sft"].rows, d.fractions.sft_val, seed, "sft_val")
    loads["data.prompts"] = load_prompts(d.prompts)
    prompts = loads["data.prompts"].rows
    if d.eval_prompts:
        loads["data.eval_prompts"] = load_prompts(d.eval_prompts)
        eval_rows = loads["data.eval_prompts"].rows
    else:
        prompts, eval_rows = _split(prompts, d.fractions.eval, seed, "eval")
    prompts, heldout = _split(prompts, d.fractions.heldout, seed, "heldout")
    pref, rounds = _split(prompts, d.fractions.rounds / max(1e-9, 1.0 - d.fractions.heldout), seed, "rounds")
    quarantined = [row for load in loads.values() for row in load.quarantined]
    ngram = p.preference.decontamination_ngram
    index = EvalIndex({"eval": [t for row in eval_rows for _, t in _texts(row)]}, ngram)
    screened: dict[str, list[dict]] = {}
    for name, rows in (
        ("sft_train", sft_train),
        ("sft_val", sft_val),
        ("pref_prompts", pref),
        ("heldout", heldout),
        ("rounds", rounds),
    ):
        screened[name], dropped = _screen(rows, index, "an evaluation prompt")
        quarantined += dropped
    splits = {**screened, "eval": eval_rows}
    inputs = {key: {**load.summary(), "n_quarantined": len(load.quarantined)} for key, load in loads.items()}
    for key, load in loads.items():  # rows screened out count against the file they came from
        origin = load.origin
        extra = sum(
            1
            for row in quarantined
            if str(row["location"]).startswith(origin) and row["reason"].startswith("contaminated")
        )
        inputs[key]["n_quarantined"] += extra
    _check_kl_prompts(p, len(splits["heldout"]))
    return PreparedData({name: splits[name] for name in SPLITS}, quarantined, inputs)


def _check_kl_prompts(p: Params, n_heldout: int) -> None:
    """Stage 3 and every KL measurement after it read the first init.kl_prompts held-out prompts: stop here,
    before SFT runs, when the user's prompts give fewer (check_params cannot know how many a fraction gives)."""
    if n_heldout < p.init.kl_prompts:
        raise UserError(
            f"init.kl_prompts: {p.init.kl_prompts} held-out prompts are needed for the KL measurements, but "
            f"data.prompts gives {n_heldout} (data.fractions.heldout {p.data.fractions.heldout}, after "
            f"screening); set init.kl_prompts to at most {n_heldout}, or raise data.fractions.heldout or add prompts"
        )
