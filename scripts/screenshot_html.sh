#!/usr/bin/env bash
# Screenshot a local HTML page (e.g. the `clarify report --html` audit page) with headless Chromium.
#
#   scripts/screenshot_html.sh PAGE.html OUT.png [WIDTH,HEIGHT]      (default size 1400,1000)
#
# Needs Debian's chromium (`apt-get install -y chromium`). The flags keep it offline and stateless: no sandbox (runs
# as root in containers), no GPU, no QUIC/background networking/component updates/sync, and a throwaway profile so
# no state leaks between runs.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 PAGE.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
page=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1400,1000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z $browser ]]; then
    echo "$0: no chromium found (apt-get install -y chromium)" >&2
    exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --window-size="$size" \
    --screenshot="$out" "file://$page"
echo "wrote $out"
