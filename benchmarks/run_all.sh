#!/usr/bin/env bash
# Run every registered benchmark; JSON files land in the given folder.
set -euo pipefail
out="${1:-bench-results}"; shift || true
mkdir -p "$out"
for name in $(secfl bench --list | awk '{print $1}'); do
  echo "== $name"
  secfl bench "$name" --out "$out/$name.json" "$@"
done
