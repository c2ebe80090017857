#!/usr/bin/env bash
# The venv of `make test-server`: llama-cpp-python[server] (pinned) in its own venv, so the main .venv never gets a
# C++ build. The first run builds the wheel from PyPI's source package (llama.cpp compiled with the machine's gcc and
# cmake: minutes) and keeps it in a wheel folder under the user's cache; later runs, and a re-created venv, install
# that wheel (its Python dependencies, fastapi, uvicorn, sse-starlette, pydantic-settings, starlette-context …, come
# from PyPI). Usage: scripts/server_venv.sh VENV VERSION WHEELHOUSE
set -euo pipefail
venv=$1 version=$2 wheels=$3
spec="llama-cpp-python[server]==${version}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$version" <<'PY' 2>/dev/null; then
import sys, importlib.metadata as m, llama_cpp.server  # noqa: F401
sys.exit(m.version("llama_cpp_python") != sys.argv[1])
PY
  echo "[test-server] $venv has llama-cpp-python $version"
  exit 0
fi
mkdir -p "$wheels"
if ! compgen -G "$wheels/llama_cpp_python-${version}-*.whl" > /dev/null; then
  echo "[test-server] building llama-cpp-python ${version} from source into $wheels (once; minutes on 2 cores)"
  start=$(date +%s)
  python3 -m pip wheel --no-deps -w "$wheels" "llama-cpp-python==${version}"
  echo "[test-server] wheel built in $(( $(date +%s) - start )) s"
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q --find-links "$wheels" "$spec"
echo "[test-server] $venv: $("$venv/bin/python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"
