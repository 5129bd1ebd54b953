#!/usr/bin/env bash
# The test suite (slow tests excluded; add `-m slow` for those). Extra flags go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q "$@"
