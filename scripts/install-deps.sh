#!/usr/bin/env bash
# Installs what pgwarden's demo and tests need from Debian's packages, only
# where it is missing. Needs root (or sudo) when something must be installed.
set -euo pipefail

missing=()
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || missing+=("$2")
}
need etcd etcd-server
need etcdctl etcd-client
need haproxy haproxy
need ip iproute2
need protoc protobuf-compiler
need wrk wrk
need psql postgresql-client
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts packaged services; pgwarden starts its own etcd and HAProxy.
for svc in etcd haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        ${sudo:-} systemctl stop "$svc" || true
    fi
done
