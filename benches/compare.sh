#!/usr/bin/env bash
# netcluster side by side with Node's cluster (rr and none), nginx, a Node.js program run by
# netcluster, a single-process tokio server and the bare hand-off floor, on this machine, in
# one run.
#
#   bash benches/compare.sh            # the full run (2 and 8 workers; under 10 minutes),
#                                      # written into docs/benchmarks.md
#   bash benches/compare.sh --quick    # 2 workers, shorter windows, without the Node.js program
#                                      # worker and the floor without answers (under 2
#                                      # minutes), printed only
#   bash benches/compare.sh --only rr,nginx   # some servers (rr shared reuseport node-program
#                                             # node-rr node-none nginx tokio floor floor-no-ack)
#
# Installs what it needs from the distribution's packages (wrk, nginx, node), builds the
# release binaries, and runs benches/compare.rs; see benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v node >/dev/null 2>&1 || need+=(nodejs)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The package starts a system nginx on port 80; the benchmark runs its own.
  if [[ " ${need[*]} " == *" nginx "* ]]; then
    $sudo systemctl stop nginx 2>/dev/null || $sudo pkill -x nginx 2>/dev/null || true
  fi
fi
export PATH="$PATH:/usr/sbin"

echo "== building the release binaries" >&2
cargo build --release --quiet --bin netcluster --example tokio_baseline --example handoff_floor

args=("$@")
quick=false
for a in "$@"; do [ "$a" = "--quick" ] && quick=true; done
only=false
for a in "$@"; do [ "$a" = "--only" ] && only=true; done
if ! $quick && ! $only; then
  args+=(--write docs/benchmarks.md)
fi
cargo bench --quiet --bench compare -- "${args[@]}"
