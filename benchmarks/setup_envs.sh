#!/usr/bin/env bash
# Create the peers' virtual environments (idempotent) under .cache/benchmarks/ (git-ignored).
#   trl:         torch 2.13.0 CPU (pinned: a plain `torch` pulls a multi-GB CUDA build) + trl, peft, transformers
#   mlx-lm-lora: mlx-lm-lora (+ mlx[cpu]); its read of the Metal-only device field is patched here, not in the repo
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')/bin/python3.11}
ROOT=.cache/benchmarks
mkdir -p "$ROOT"
want=${1:-all}

if [[ $want == all || $want == trl ]] && [[ ! -f $ROOT/venv-trl/.ok ]]; then
  rm -rf "$ROOT/venv-trl"; "$PYTHON" -m venv "$ROOT/venv-trl"
  "$ROOT/venv-trl/bin/pip" install -q --upgrade pip
  "$ROOT/venv-trl/bin/pip" install -q torch==2.13.0
  "$ROOT/venv-trl/bin/pip" install -q trl peft transformers "numpy<3" threadpoolctl
  touch "$ROOT/venv-trl/.ok"
fi

if [[ $want == all || $want == mlx-lm-lora ]] && [[ ! -f $ROOT/venv-mlx-lm-lora/.ok ]]; then
  rm -rf "$ROOT/venv-mlx-lm-lora"; "$PYTHON" -m venv "$ROOT/venv-mlx-lm-lora"
  "$ROOT/venv-mlx-lm-lora/bin/pip" install -q --upgrade pip
  "$ROOT/venv-mlx-lm-lora/bin/pip" install -q mlx-lm-lora "mlx[cpu]"
  # Metal-only field: mx.device_info()["max_recommended_working_set_size"] raises KeyError on Linux CPU.
  "$ROOT/venv-mlx-lm-lora/bin/python" - <<'PY'
import pathlib, re, site
n = 0
for sp in site.getsitepackages():
    for f in pathlib.Path(sp, "mlx_lm_lora").rglob("*.py"):
        s = f.read_text()
        t = re.sub(r'(mx\.(?:metal\.)?device_info\(\))\[\s*"max_recommended_working_set_size"\s*\]',
                   r'\1.get("max_recommended_working_set_size", 0)', s)
        if t != s:
            f.write_text(t); n += 1
print(f"patched max_recommended_working_set_size in {n} file(s)")
PY
  # MLX must use OpenBLAS as in dpoflow's venv (the wheel's bundled reference BLAS is ~20x slower)
  libs=$(ls -d "$ROOT"/venv-mlx-lm-lora/lib/python3.11/site-packages/mlx_cpu.libs 2>/dev/null || true)
  if [[ -n $libs && -f /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ]]; then
    for f in "$libs"/libblas-*.so*; do [[ $f == *.reference ]] || { mv "$f" "$f.reference"; ln -s /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 "$f"; }; done
    for f in "$libs"/liblapack-*.so*; do [[ $f == *.reference ]] || { mv "$f" "$f.reference"; ln -s /usr/lib/x86_64-linux-gnu/openblas-pthread/liblapack.so.3 "$f"; }; done
  fi
  touch "$ROOT/venv-mlx-lm-lora/.ok"
fi
echo "envs ready under $ROOT"
