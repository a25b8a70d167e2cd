#!/usr/bin/env bash
# Fill a wheel folder (default .whl/ in the repo root, ignored by git) with what the lent GPU machine
# lacks for scripts/gpu_check.sh, for its Python 3.12 (x86-64): the pinned transformers (it has 5.17),
# webdataset + braceexpand, deepspeed and the dependencies that image does not hold (hjson, pydantic,
# pydantic-core, annotated-types, typing-inspection, the typing-extensions pydantic needs, and regex:
# transformers 5.23 checks regex>=2025.10.22 at import). deepspeed ships only an sdist: it is built
# here into a pure-Python wheel (no ops prebuilt; they compile on first use there). Prints the
# folder's size and fails above 60 MiB (a device call carries 64 MiB, the working tree included).
#
#   bash scripts/gpu_wheels.sh [--wheels DIR]      (uses the python of .venv or $PYTHON; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (allowed: --wheels DIR, --help)" >&2; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif [ -x /work/main/.venv/bin/python ]; then PY=/work/main/.venv/bin/python
else PY=python3; fi

# The versions the CPU venv runs (requirements.txt and what pip resolved there); one version of each.
PURE=(transformers==5.23.0 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4
      annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 peft==0.21.2)
BINARY=(pydantic-core==2.50.5 regex==2026.11.19)
DEEPSPEED=deepspeed==0.19.8
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)

pipq() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
mkdir -p "$WHEELS"
# A git-ignored folder (repo root .gitignore has /.whl/); say so when another folder is used.
git check-ignore -q "$WHEELS" 2>/dev/null || echo "[gpu_wheels] note: $WHEELS is not ignored by git; the device tool sends it anyway, carry it only if ignored"
echo "[gpu_wheels] downloading ${PURE[*]} ${BINARY[*]} into $WHEELS"
pipq download -q --disable-pip-version-check --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$WHEELS" \
  "${PURE[@]}" "${BINARY[@]}"
if ! ls "$WHEELS"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "[gpu_wheels] building the $DEEPSPEED wheel from its sdist (pure Python, DS_BUILD_OPS=0)"
  pipq download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$tmp" "$DEEPSPEED"
  # --no-build-isolation: its setup.py imports torch, which the build venv already has.
  DS_BUILD_OPS=0 pipq wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$WHEELS" "$tmp"/deepspeed-*.tar.gz
fi
# One version of each: two stop the whole install there.
dups=$(ls "$WHEELS"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "[gpu_wheels] FAIL: more than one wheel of: $dups (remove the old ones)" >&2; exit 1; fi
ls -1 "$WHEELS"/*.whl
bytes=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "[gpu_wheels] $WHEELS: $(ls "$WHEELS"/*.whl | wc -l) wheels, $bytes bytes (${mib} MiB; the device call carries 64 MiB in all)"
if [ "$bytes" -gt $(( 60 * 1048576 )) ]; then
  echo "[gpu_wheels] FAIL: over 60 MiB, leaving too little of the 64 MiB for the working tree" >&2
  exit 1
fi
