# Sourced by main.sh and test.sh: create .venv if needed and (re)install the project into it
# whenever pyproject.toml or the constraints change. torch, torchvision, torchaudio and xformers come from constraints/cpu.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PD_VENV:-$ROOT/.venv}"
EXTRAS="${PD_EXTRAS:-test,sd,deepspeed,xformers}"
CONSTRAINTS="${PD_CONSTRAINTS:-$ROOT/constraints/cpu.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$VENV/.pd-installed" 2>/dev/null)" != "$stamp" ]; then
  echo "installing perceptual-diffusion[$EXTRAS] into $VENV ..." >&2
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      -c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; echo "pip install failed" >&2; exit 1
  fi
  rm -f "$log"
  "$VENV/bin/python" -c "import torch, perceptual_diffusion, backbones" \
    || { echo "installation failed" >&2; exit 1; }
  echo "$stamp" > "$VENV/.pd-installed"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
