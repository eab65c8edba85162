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

import importlib
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from dpoflow.core.batching import encode_prompt, pad_id
from dpoflow.core.logprobs import body_and_head
from dpoflow.data.feedback import feedback_pairs
from dpoflow.data.formats import load_hub_pairs, load_pairs
from dpoflow.data.human_labels import load_argilla, load_label_studio
from dpoflow.data.pairs import LoadResult
from dpoflow.data.prompts import reference_of, verify
from dpoflow.modeling.reward_model import load_reward_model
from dpoflow.runtime.errors import UserError
from dpoflow.runtime.params import JUDGES, PYTHON_JUDGE

Messages = list[dict[str, str]]


class JudgeError(UserError, ValueError):
    """A judge cannot be built or used (missing import file, missing reward model, ...)."""


class Judge:
    """The judge interface. Scoring judges implement `score`; the import judge implements `load`."""

    name: str = "judge"
    generates: bool = True  # False: no sampling, the judge provides labelled pairs through load()
    relative: bool = False  # True: a score ranks a prompt's responses against each other (one alone scores 1/2)

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
            if reference_of(item) is None:
                raise JudgeError(
                    f"prompt {i} ({item.get('id')!r}): the verifier needs a reference answer (the embedded task's, or "
                    "a `reference` column in your prompts); use the reward_model, llm or python:<module>:<function> "
                    "judge for open-ended prompts"
                )
            out.append([float(verify(item, text)) for text in texts])
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
    relative = True  # centred per prompt

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
        self.info: dict[str, Any] = {}

    @property
    def is_local(self) -> bool:
        path = Path(self.path).expanduser()
        return path.exists() or _looks_like_file(self.path)

    @property
    def source(self) -> str:
        return f"import:{self.path}"

    def load(self, **kwargs: Any) -> LoadResult:
        """The labelled pairs. Annotation-tool exports (argilla, label_studio) and production feedback (feedback:
        rows grouped per prompt into pairs; `info` keeps the row counts) are read by their own readers."""
        if self.fmt in ("argilla", "label_studio", "feedback"):
            reader = {"argilla": load_argilla, "label_studio": load_label_studio, "feedback": feedback_pairs}
            loaded = reader[self.fmt](self.path)
            self.info = {"format": self.fmt, "fingerprint": loaded.fingerprint, "n_rows": loaded.n_input}
            if self.fmt == "feedback":
                self.info.update(n_prompts=loaded.n_prompts, n_unpaired_prompts=loaded.n_unpaired_prompts)
            return LoadResult(
                list(loaded.pairs),
                list(loaded.quarantined),
                len(loaded.pairs) + len(loaded.quarantined),
                list(loaded.locations),
            )
        kwargs.setdefault("score_scale", self.score_scale)
        if self.is_local:
            return load_pairs(Path(self.path).expanduser(), self.fmt, **kwargs)
        name, _, split = self.path.removeprefix("hf:").partition(":")
        return load_hub_pairs(name, split=split or "train", fmt=self.fmt, **kwargs)


def _looks_like_file(spec: str) -> bool:
    """A path, not a datasets name: has a file suffix we read, or starts like a path."""
    return spec.startswith(("/", ".", "~")) or spec.endswith((".jsonl", ".json", ".parquet")) or spec.count("/") > 1


DEFAULT_TEMPLATE = """Which response answers the prompt better?

Prompt:
{prompt}

Response A:
{response_a}

Response B:
{response_b}

Reply with one letter: A or B."""


class LlmJudge(Judge):
    """A local model judging pairwise (judges.model, a folder or .gguf): the chat-formatted `template` with the
    prompt and two responses, and the verdict is whichever of the letters A and B the judge model gives the higher
    next-token logit. Each pair is judged in both orders; a disagreement counts as a tie (position bias), and
    `position_bias_rate` reports how often that happened. A response's score is its mean outcome against the prompt's
    other responses (1 win, 1/2 tie, 0 loss), so a prompt with K responses costs K (K - 1) judge forwards, batched."""

    name = "llm"
    relative = True  # pairwise

    def __init__(self, model: Any, tokenizer: Any, template: str | None = None, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.template = template or DEFAULT_TEMPLATE
        for field in ("{prompt}", "{response_a}", "{response_b}"):
            if field not in self.template:
                raise JudgeError(f"judge llm: the template lacks {field}")
        self.batch_size = max(1, int(batch_size))
        self.letters = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in ("A", "B")]
        self.comparisons = self.inconsistent = 0

    @property
    def position_bias_rate(self) -> float | None:
        """Share of pairs whose verdict flipped with the order of the responses (counted as ties)."""
        return self.inconsistent / self.comparisons if self.comparisons else None

    def _shown(self, prompt: Messages) -> str:
        return "\n".join(m["content"] for m in prompt if m["role"] != "system")

    def prefers_a(self, requests: Sequence[tuple[Messages, str, str]]) -> list[bool]:
        """For each (prompt, response A, response B): does the judge prefer A?"""
        encoded = [
            encode_prompt(
                self.tokenizer,
                [
                    {
                        "role": "user",
                        "content": self.template.format(prompt=self._shown(prompt), response_a=a, response_b=b),
                    }
                ],
            )
            for prompt, a, b in requests
        ]
        split = body_and_head(self.model)
        out = [False] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        pad = pad_id(self.tokenizer)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = mx.array([encoded[i] + [pad] * (width - len(encoded[i])) for i in idx])
            last = mx.array([len(encoded[i]) - 1 for i in idx])
            if split is None:
                logits = self.model(ids)[mx.arange(len(idx)), last]
            else:  # right padding: a row's last real position does not see the padding after it
                body, head = split
                logits = head(body(ids)[mx.arange(len(idx)), last])
            pick = logits[:, self.letters[0]] > logits[:, self.letters[1]]
            for i, a_wins in zip(idx, pick.tolist()):
                out[i] = bool(a_wins)
        return out

    def score(self, items, prompts, responses):
        requests, where = [], []
        for p_index, (prompt, texts) in enumerate(zip(prompts, responses)):
            for i in range(len(texts)):
                for j in range(len(texts)):
                    if i != j:
                        requests.append((list(prompt), texts[i], texts[j]))
                        where.append((p_index, i, j))
        verdict = dict(zip(where, self.prefers_a(requests))) if requests else {}
        out = []
        for p_index, texts in enumerate(responses):
            k = len(texts)
            wins = [0.0] * k
            for i in range(k):
                for j in range(i + 1, k):
                    i_first, j_first = verdict[(p_index, i, j)], verdict[(p_index, j, i)]
                    self.comparisons += 1
                    if i_first != j_first:  # both orders agree on a winner
                        wins[i if i_first else j] += 1.0
                    else:
                        self.inconsistent += 1
                        wins[i] += 0.5
                        wins[j] += 0.5
            out.append([w / (k - 1) if k > 1 else 0.5 for w in wins])
        return out


class PythonJudge(Judge):
    """The user's own verifier, `python:<module>:<function>`: function(prompt messages, response, item) -> a score
    in [0, 1] (item: the prompt's row, with its `reference` and `category` when the data has them). The module is
    imported from `search_path` (the inputs folder's judge/) or the environment."""

    def __init__(self, spec: str, search_path: str | Path | None = None):
        match = PYTHON_JUDGE.match(spec)
        if match is None:
            raise JudgeError(f"judge {spec!r}: expected python:<module>:<function>")
        module_name, function = match.groups()
        self.name = spec
        if search_path is not None and str(search_path) not in sys.path:
            sys.path.insert(0, str(search_path))
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # the user's module: any import error is theirs to see, in one line
            raise JudgeError(
                f"judge {spec}: module {module_name!r} does not import: {type(err).__name__}: {err}"
            ) from None
        self.fn = getattr(module, function, None)
        if not callable(self.fn):
            raise JudgeError(f"judge {spec}: {module_name}.{function} is not a function")

    def score(self, items, prompts, responses):
        out = []
        for i, (item, prompt, texts) in enumerate(zip(items, prompts, responses)):
            row = []
            for text in texts:
                value = self.fn(list(prompt), text, dict(item or {}))
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    raise JudgeError(f"judge {self.name}: prompt {i}: returned {value!r}; expected a number in [0, 1]")
                row.append(float(value))
            out.append(row)
        return out


def make_judge(
    spec: str,
    *,
    import_path: str | Path | None = None,
    import_format: str = "auto",
    reward_model_path: str | Path | None = None,
    llm_model: Any = None,
    llm_template: str | None = None,
    python_path: str | Path | None = None,
    batch_size: int = 8,
    reward_model: Any = None,
) -> Judge:
    """The judge `spec` names (runtime.params.JUDGES or python:<module>:<function>). `llm_model` is a loaded
    (model, tokenizer) for the llm judge; `python_path` the folder the user's judge module is imported from."""
    if spec == "verifier":
        return VerifierJudge()
    if spec == "reward_model":
        return RewardModelJudge(reward_model_path, batch_size=batch_size, reward_model=reward_model)
    if spec == "import":
        return ImportJudge(import_path, fmt=import_format)
    if spec == "llm":
        if llm_model is None:
            raise JudgeError("judge llm needs a judge model (judges.model)")
        return LlmJudge(*llm_model, template=llm_template, batch_size=batch_size)
    if spec.startswith("python:"):
        return PythonJudge(spec, python_path)
    raise JudgeError(f"unknown judge {spec!r}; judges: {', '.join(JUDGES)}, python:<module>:<function>")
