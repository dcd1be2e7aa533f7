#!/usr/bin/env bash
# Fuzzes Duet's decoders of untrusted input for a bounded time each: the log
# decoder and the channel's wire decoder (logchannel/fuzz), the arbiter's
# request parser and the client's reply parser (tas-server/fuzz), and the
# virtio-net model's walk of guest-controlled rings (virtio-dev/fuzz). Each
# target checks properties (round trips, agreement between decoders,
# bounded allocation, determinism), not only the absence of panics.
#
#   DUET_FUZZ_SECS   seconds per target (default 30; 0 skips fuzzing)
#
# Needs the nightly toolchain (installed with rustup if missing) and
# cargo-fuzz (installed with cargo if missing). Runs from a temporary copy
# of the committed seeds, so the seed directories stay as committed. Exits
# non-zero if any target finds a failing input, and prints where it is
# (under the fuzz crate's artifacts/, which git ignores); reproduce with
# `cargo +nightly fuzz run TARGET PATH` in that crate.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${DUET_FUZZ_SECS:-30}
if [[ $secs == 0 ]]; then
    echo "tests/fuzz.sh: DUET_FUZZ_SECS=0, not fuzzing"
    exit 0
fi
CARGO_FUZZ_VERSION=0.13.2
targets=(logchannel:log logchannel:channel tas-server:request tas-server:reply virtio-dev:net)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "tests/fuzz.sh: installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal </dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "tests/fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" </dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# Build first, so that the time limit is spent fuzzing.
for crate in $(printf '%s\n' "${targets[@]%%:*}" | uniq); do
    echo "tests/fuzz.sh: building $crate/fuzz"
    (cd "$crate/fuzz" && cargo +nightly fuzz build)
done

failed=()
for entry in "${targets[@]}"; do
    crate=${entry%%:*} target=${entry#*:}
    corpus=$work/$crate-$target
    log=$work/$crate-$target.log
    mkdir -p "$corpus"
    echo "tests/fuzz.sh: fuzzing $crate $target for ${secs}s"
    if (cd "$crate/fuzz" && cargo +nightly fuzz run "$target" "$corpus" "corpus/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=1024 -max_len=65536 >"$log" 2>&1); then
        grep -E '^Done [0-9]+ runs' "$log" || true
    else
        failed+=("$crate $target")
        echo "tests/fuzz.sh: $crate $target FAILED; the end of its output:" >&2
        grep -E -A3 'panicked at|ERROR: ' "$log" | head -20 >&2 || true
        grep -vE '^"|# Uses:|^ +(#?[0-9]+|at) ' "$log" | tail -15 >&2
        inputs=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
        for input in $inputs; do
            echo "tests/fuzz.sh: failing input: $input" >&2
        done
    fi
done

echo "tests/fuzz.sh: ${#targets[@]} targets in $((SECONDS - start))s"
if ((${#failed[@]})); then
    echo "tests/fuzz.sh: failures in: ${failed[*]}" >&2
    exit 1
fi
