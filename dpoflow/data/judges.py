"""Judges: who decides which of two responses is better. Three behind one small interface.

    judge = make_judge("verifier")                                  # or "reward_model", "import"
    scores = judge.score(items, prompts, responses)                 # [prompt][response] in [0, 1]

A *scoring* judge (`generates = True`) rates sampled responses; Stage 2 turns the scores into pairs
(dpoflow.data.collect). The *import* judge (`generates = False`) rates nothing: it hands over pairs somebody
else labelled (humans, another model, a dataset) through `load()`.

Score scale (what `score_chosen`/`score_rejected` of a pair hold), always in [0, 1], higher is better:

* ``verifier`` -- the task's own checker, ``dpoflow.data.tasks.score(item, response)``: 1.0 = correct, 0.0 = wrong or
  no answer; partial credit exactly as the checker gives it (for the numeric tasks of the embedded default the
  checker snaps to 0/1, so every verifier pair has gap 1.0; non-numeric reasoning-gym tasks keep their graded
  scale). Deterministic, needs the task item (its answer and generator config).
* ``reward_model`` -- a Bradley-Terry reward model (Stage 4, ``modeling.reward_model``) gives a raw reward r_j to
  each response j of a prompt; the score is ``sigmoid((r_j - mean_k r_k) / scale)`` with the mean over the
  prompt's responses (scale 1.0 by default). Under the Bradley-Terry model, sigmoid(r_a - r_b) is the probability
  that a is preferred to b, so the score reads "probability that this response beats a typical response to the
  same prompt": 0.5 = average, and the difference of two scores grows with their reward difference. Raw rewards
  carry an arbitrary per-prompt offset; centring on the prompt's mean removes it.
* ``import`` -- the scores the file carries, normalized to [0, 1] by ``dpoflow.data.formats`` (a 1..k rating maps to
  (s - 1) / (k - 1)), or None for label-only pairs (validation then counts their gap as 1.0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpoflow.data import tasks
from dpoflow.data.formats import load_hub_pairs, load_pairs
from dpoflow.data.pairs import LoadResult
from dpoflow.modeling.reward_model import load_reward_model
from dpoflow.runtime.params import JUDGES

Messages = list[dict[str, str]]


class JudgeError(ValueError):
    """A judge cannot be built or used (missing import file, missing reward model, ...)."""


class Judge:
    """The judge interface. Scoring judges implement `score`; the import judge implements `load`."""

    name: str = "judge"
    generates: bool = True  # False: no sampling, the judge provides labelled pairs through load()

    @property
    def source(self) -> str:
        """Provenance written into the `source` column of the pairs this judge labels."""
        return self.name

    def score(
        self, items: Sequence[Mapping[str, Any]], prompts: Sequence[Messages], responses: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Scores in [0, 1], shaped like `responses` ([prompt][response]). `items[i]` is the task item of
        prompt i (None when the prompt has no task item), `prompts[i]` its chat messages."""
        raise TypeError(f"judge {self.name!r} does not score responses; it provides labelled pairs (load())")

    def load(self, **kwargs: Any) -> LoadResult:
        """Labelled pairs (import judge only); kwargs are those of dpoflow.data.formats.load_pairs."""
        raise TypeError(f"judge {self.name!r} scores sampled responses; it has no pairs to load")


class VerifierJudge(Judge):
    """The task's checker: `dpoflow.data.tasks.score(item, response)` (1.0 correct, partial credit as the checker
    gives, 0.0 wrong or no answer)."""

    name = "verifier"

    def score(self, items, prompts, responses):
        if len(items) != len(responses):
            raise ValueError(f"{len(items)} items but {len(responses)} response lists")
        out = []
        for i, (item, texts) in enumerate(zip(items, responses)):
            if item is None:
                raise JudgeError(f"prompt {i}: the verifier needs a task item (answer + checker) for every prompt")
            out.append([float(tasks.score(item, text)) for text in texts])
        return out


def centred_sigmoid(rewards: Sequence[float], scale: float = 1.0) -> list[float]:
    """sigmoid((r_j - mean(r)) / scale) for each reward of one prompt (see the module docstring)."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    return [_sigmoid((r - mean) / scale) for r in rewards]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class RewardModelJudge(Judge):
    """Stage 4's reward model: raw rewards -> centred sigmoid per prompt (see the module docstring).

    Codes against `dpoflow.modeling.reward_model`: ``load_reward_model(path) -> RewardModel`` and
    ``RewardModel.score(prompts, responses, batch_size) -> list[float]`` (one raw reward per (prompt, response)).
    Pass `reward_model` to use an already-loaded model (or a stand-in in tests).
    """

    name = "reward_model"

    def __init__(self, path: str | Path | None, batch_size: int = 8, scale: float = 1.0, reward_model: Any = None):
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.path, self.batch_size, self.scale = path, int(batch_size), float(scale)
        self._model = reward_model

    @property
    def model(self) -> Any:
        if self._model is None:
            if self.path is None or not Path(self.path).exists():
                raise JudgeError(
                    f"judge reward_model: reward model folder not found: {self.path} "
                    "(train it first: dvc repro reward_model)"
                )
            self._model = load_reward_model(self.path)
        return self._model

    def score(self, items, prompts, responses):
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
        flat_prompts = [list(p) for p, texts in zip(prompts, responses) for _ in texts]
        flat_responses = [t for texts in responses for t in texts]
        raw = list(self.model.score(flat_prompts, flat_responses, batch_size=self.batch_size)) if flat_responses else []
        if len(raw) != len(flat_responses):
            raise JudgeError(f"reward model returned {len(raw)} rewards for {len(flat_responses)} responses")
        out, start = [], 0
        for texts in responses:
            rewards = [float(r) for r in raw[start : start + len(texts)]]
            if not all(math.isfinite(r) for r in rewards):
                raise JudgeError(f"reward model returned a non-finite reward: {rewards}")
            out.append(centred_sigmoid(rewards, self.scale))
            start += len(texts)
        return out


class ImportJudge(Judge):
    """Human or external labels: a local JSONL/Parquet file (any format dpoflow.data.pairs reads), or a Hugging Face
    datasets name (``name`` or ``name:split``, default split train; needs network or a warm cache)."""

    name = "import"
    generates = False

    def __init__(self, path: str | Path, fmt: str = "auto", score_scale: float | None = None):
        if path is None or not str(path).strip():
            raise JudgeError("judge import needs preference.import_path (a JSONL/Parquet file or a datasets name)")
        self.path, self.fmt, self.score_scale = str(path), fmt, score_scale

    @property
    def is_local(self) -> bool:
        path = Path(self.path).expanduser()
        return path.exists() or _looks_like_file(self.path)

    @property
    def source(self) -> str:
        return f"import:{self.path}"

    def load(self, **kwargs: Any) -> LoadResult:
        kwargs.setdefault("score_scale", self.score_scale)
        if self.is_local:
            return load_pairs(Path(self.path).expanduser(), self.fmt, **kwargs)
        name, _, split = self.path.partition(":")
        return load_hub_pairs(name, split=split or "train", fmt=self.fmt, **kwargs)


def _looks_like_file(spec: str) -> bool:
    """A path, not a datasets name: has a file suffix we read, or starts like a path."""
    return spec.startswith(("/", ".", "~")) or spec.endswith((".jsonl", ".json", ".parquet")) or spec.count("/") > 1


def make_judge(
    name: str,
    *,
    import_path: str | Path | None = None,
    import_format: str = "auto",
    import_score_scale: float | None = None,
    reward_model_path: str | Path | None = None,
    batch_size: int = 8,
    reward_scale: float = 1.0,
    reward_model: Any = None,
) -> Judge:
    """The judge named by `preference.judge` (one of JUDGES)."""
    if name == "verifier":
        return VerifierJudge()
    if name == "reward_model":
        return RewardModelJudge(reward_model_path, batch_size=batch_size, scale=reward_scale, reward_model=reward_model)
    if name == "import":
        return ImportJudge(import_path, fmt=import_format, score_scale=import_score_scale)
    raise JudgeError(f"unknown judge {name!r}; judges: {', '.join(JUDGES)}")
