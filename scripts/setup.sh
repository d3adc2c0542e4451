#!/usr/bin/env bash
# Creates .venv and installs the project with what export, the embedded server and the tests need.
# torch is pinned to 2.13.0 first: on this kind of machine that is a local CPU build (fast, ~200 MB);
# elsewhere pip downloads it (add --index-url https://download.pytorch.org/whl/cpu for a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The embedded tritonserver's python-backend stub links libpythonX.Y.so.1.0. Debian's python3 package
# does not install it (package libpythonX.Y); install it where we can, else say what is missing.
PYV=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LIBDIR=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
if [ ! -e "$LIBDIR/libpython$PYV.so.1.0" ] && ! ldconfig -p 2>/dev/null | grep -q "libpython$PYV.so.1.0"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing libpython$PYV (needed by Triton's python backend stub)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "libpython$PYV") >/dev/null
  else
    echo "WARNING: libpython$PYV.so.1.0 not found: the embedded tritonserver cannot run python models." >&2
    echo "         Install it (Debian/Ubuntu: sudo apt-get install libpython$PYV)." >&2
  fi
fi
# The front (crisis_triton/serving/front.py) runs Debian's nginx with its Lua module and lua-cjson (the request
# checks of crisis_triton/serving/front_guard.lua); the monitoring test runs Debian's prometheus (with promtool).
# Install them where we can (root with apt); without them those tests skip and say why.
if ! { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || ! command -v promtool >/dev/null \
   || [ ! -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || ! ls /usr/lib/*/lua/5.1/cjson.so >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing nginx (with its Lua module, lua-cjson) and prometheus (front, monitoring tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      nginx libnginx-mod-http-lua lua-cjson prometheus) >/dev/null 2>&1 \
      || echo "WARNING: could not install nginx/lua/prometheus: their tests will skip" >&2
  else
    echo "nginx/prometheus missing and not root with apt: the TLS front and monitoring tests will skip" >&2
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[export,server,dev]"
# TensorRT's type stubs (10.x API) for mypy, outside site-packages: the package requires TensorRT
# itself (GPU wheels from pypi.nvidia.com), and a stubs-only `tensorrt` folder would import as an
# empty namespace package. Only mypy reads them (pyproject.toml [tool.mypy] mypy_path).
TRT_STUBS=tensorrt-stubs==10.13.0.35.1
if [ "$(cat .venv/typing-stubs/.installed 2>/dev/null)" != "$TRT_STUBS" ]; then
  rm -rf .venv/typing-stubs
  .venv/bin/python -m pip install -q --no-deps --target .venv/typing-stubs "$TRT_STUBS"
  # The generated stubs have two Python syntax errors (a parameter named `in`, a parameter without
  # default after defaulted ones) that stop mypy; mend exactly those.
  sed -i -E -e 's/([(,] *)in: /\1in_: /g' \
    -e 's/channel_axis: int\) -> IScaleLayer/channel_axis: int = ...) -> IScaleLayer/' \
    .venv/typing-stubs/tensorrt_bindings/tensorrt.pyi
  echo "$TRT_STUBS" > .venv/typing-stubs/.installed
fi
.venv/bin/python -c "import torch, transformers, onnxruntime, tritonclient; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
