"""The judge a stage scores with (preference.judge at Stage 2, iterate.judge at Stage 6, evaluate.judge at Stage 7),
built from the project's files: the user's judge inputs under <inputs>/judge, Stage 4's reward model for Stages 6
and 7, and a cache for a converted judge model (.gguf -> mlx-lm folder)."""

from __future__ import annotations

from pathlib import Path

from dpoflow.data import judges
from dpoflow.modeling import loading
from dpoflow.modeling.base import resolve_base
from dpoflow.runtime import io
from dpoflow.runtime.params import Params, input_folder

STAGE4_REWARD_MODEL = Path("models/reward")
STAGE4_METRICS = Path("metrics/reward_model.json")
JUDGE_MODEL_CACHE = Path(".cache/judge_model")  # a converted .gguf judge (git- and DVC-ignored)


def judge_for(p: Params, stage: str, batch_size: int) -> tuple[judges.Judge, str]:
    """(judge, what to report about it) for `stage` ("preference", "iterate" or "evaluate")."""
    spec = p.stage_judge(stage)
    reward_model_path, described = None, spec
    if spec == "reward_model":
        if stage == "preference":
            reward_model_path = p.judges.reward_model
        else:
            reward_model_path = STAGE4_REWARD_MODEL
            accuracy = io.read_json(STAGE4_METRICS).get("rm_accuracy") if STAGE4_METRICS.is_file() else None
            described = "reward_model (Stage 4" + (
                f", held-out accuracy {accuracy:.3f})" if accuracy is not None else ")"
            )
    llm_model, template = None, None
    if spec == "llm":
        folder = resolve_base(p.judges.model, JUDGE_MODEL_CACHE, seed=p.seed, dtype=p.model.dtype)
        llm_model = loading.load_model(folder, dtype=p.model.dtype)
        template = Path(p.judges.template).read_text(encoding="utf-8") if p.judges.template else None
        described = f"llm ({p.judges.model})"
    judge = judges.make_judge(
        spec,
        import_path=p.preference.import_path,
        import_format=p.preference.import_format,
        reward_model_path=reward_model_path,
        llm_model=llm_model,
        llm_template=template,
        python_path=input_folder(p, "judge"),
        batch_size=batch_size,
    )
    return judge, described
