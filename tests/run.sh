#!/usr/bin/env bash
# Duet's test command: installs what the suite needs on Debian (when
# something is missing), then runs the whole suite. Arguments go to
# `cargo test`. Then fuzzes the decoders of untrusted input for a bounded
# time (tests/fuzz.sh; DUET_FUZZ_SECS per target, 0 to skip). Runs
# unattended: as root it needs no standard input.
#
#   redis-tools  redis-cli / redis-benchmark, real clients for the kv guest
#   iproute2     `ip`, network namespaces for the two-host tests
#   prometheus   `promtool check metrics`, which lints the --metrics endpoint
#                (the package also ships a Prometheus server and may start it
#                on port 9090; nothing here uses it)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-cli >/dev/null && command -v redis-benchmark >/dev/null || missing+=(redis-tools)
command -v ip >/dev/null || missing+=(iproute2)
command -v promtool >/dev/null || missing+=(prometheus)

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/run.sh: missing ${missing[*]}; run as root to install them with apt-get" >&2
        exit 1
    fi
    echo "tests/run.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update </dev/null
    apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
fi

cargo test --release --workspace "$@"
tests/fuzz.sh
