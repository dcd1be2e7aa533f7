#!/usr/bin/env bash
# Installs, on Debian and as root, what Duet needs and this machine lacks;
# does nothing (and needs no root) when everything is there. Unattended:
# it reads no standard input.
#
#   tests/deps.sh        what building Duet and running `duet demo` need
#   tests/deps.sh test   that, and what the test suite needs
#
# Build and demo:
#   protobuf-compiler, libprotobuf-dev
#                `protoc` and its well-known .proto files, which the
#                etcd-client crate's build script compiles etcd's API from
#   iproute2     `ip`: the demo's two hosts are network namespaces
#   libfontconfig1, fonts-dejavu-core
#                fonts for the labels of the demo's failover chart (PNG)
# Tests:
#   redis-tools  redis-cli / redis-benchmark, real clients for the guests
#   prometheus   `promtool check metrics`, which lints the --metrics endpoint
#                (the package also ships a Prometheus server and may start it
#                on port 9090; nothing here uses it)
#   etcd-server  `etcd`, a real cluster for the etcd arbiter's tests (the
#                package may start a system etcd on 2379; the tests use their
#                own ports)
set -euo pipefail

missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
[[ -e /usr/include/google/protobuf/descriptor.proto ]] || missing+=(libprotobuf-dev)
command -v ip >/dev/null || missing+=(iproute2)
ldconfig -p 2>/dev/null | grep -q 'libfontconfig\.so\.1' || missing+=(libfontconfig1)
[[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || missing+=(fonts-dejavu-core)
if [[ "${1:-}" == test ]]; then
    command -v redis-cli >/dev/null && command -v redis-benchmark >/dev/null || missing+=(redis-tools)
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v etcd >/dev/null || missing+=(etcd-server)
elif [[ -n "${1:-}" ]]; then
    echo "tests/deps.sh: unknown argument ${1:?}; use no argument (build) or 'test'" >&2
    exit 2
fi

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/deps.sh: missing ${missing[*]}; run as root to install them with apt-get" >&2
        exit 1
    fi
    echo "tests/deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update </dev/null
    apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
fi
