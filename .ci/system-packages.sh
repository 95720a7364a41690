#!/usr/bin/env bash
# The system packages the test suite drives for real, installed from Debian's registry when missing (run by
# tox before the tests, so the README's test command installs everything it needs):
#   chromium + chromium-driver  tests/test_browser.py (the MLflow UI in headless Chromium)
#   postgresql                  tests/test_postgres.py (a study shared through a real PostgreSQL server)
set -euo pipefail
missing=()
{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || missing+=(chromium chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n" || {
        echo "the tests need the Debian packages: ${missing[*]} (apt-get install -y ${missing[*]}, as root)" >&2
        exit 1
    }
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
