#!/usr/bin/env bash
# Duet's test command: installs what the suite needs on Debian (when
# something is missing; see tests/deps.sh), then runs the whole suite.
# Arguments go to `cargo test`. Then fuzzes the decoders of untrusted input
# for a bounded time (tests/fuzz.sh; DUET_FUZZ_SECS per target, 0 to skip).
# Runs unattended: as root it needs no standard input.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/deps.sh test
cargo test --release --workspace "$@"
bash tests/fuzz.sh
