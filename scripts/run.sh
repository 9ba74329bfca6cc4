#!/usr/bin/env bash
# Builds kiln and the example functions, starts `kiln serve` with the
# examples deployed, and prints how to call them. Ctrl-C stops the server.
#
#   KILN_LISTEN    address to listen on   (default 127.0.0.1:9000)
#   KILN_DATA_DIR  where state is kept    (default ./.kiln)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln/target}"
listen="${KILN_LISTEN:-127.0.0.1:9000}"
data_dir="${KILN_DATA_DIR:-.kiln}"

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v musl-gcc >/dev/null || need+=(musl-tools)
if ((${#need[@]})); then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
rustup toolchain install >/dev/null
cargo build --release --locked -p kiln
kiln="$CARGO_TARGET_DIR/release/kiln"
mkdir -p target/examples
for example in hello counter; do
  "$kiln" build "examples/$example" --output "target/examples/$example.zip"
done

# The server prints "kiln listening on http://ADDR" once it accepts requests.
coproc SERVER { exec "$kiln" serve --listen "$listen" --data-dir "$data_dir"; }
server_pid=$SERVER_PID
trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null' EXIT INT TERM
if ! read -r -t 60 ready <&"${SERVER[0]}" || [[ "$ready" != "kiln listening on "* ]]; then
  echo "kiln did not start" >&2
  exit 1
fi
endpoint="http://$listen"
for example in hello counter; do
  "$kiln" deploy "$example" "target/examples/$example.zip" --endpoint "$endpoint"
done

cat <<USAGE

kiln is running at $endpoint (data in $data_dir) with hello and counter deployed.

  curl:      curl -s $endpoint/2015-03-31/functions/hello/invocations -d '{"name":"Ada"}'
  kiln CLI:  $kiln invoke hello --payload '{"name":"Ada"}' --endpoint $endpoint
             $kiln invoke counter --endpoint $endpoint
  AWS CLI:   AWS_ACCESS_KEY_ID=kiln AWS_SECRET_ACCESS_KEY=kiln AWS_DEFAULT_REGION=us-east-1 \\
               aws lambda invoke --endpoint-url $endpoint --function-name hello \\
               --payload '{"name":"Ada"}' response.json && cat response.json
             (AWS CLI v2 also needs --cli-binary-format raw-in-base64-out)

Press Ctrl-C to stop.
USAGE
wait "$server_pid"
