# Sourced by the run scripts: install uv if missing, sync the locked environment, and activate it.
if command -v uv >/dev/null 2>&1; then
    UV=(uv)
else
    python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
    UV=(python3 -m uv)
fi
"${UV[@]}" sync --locked
source .venv/bin/activate
