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
# Environments' /tmp disks are ext4 file systems kiln makes with mkfs.ext4.
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
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

# The server prints "kiln listening on http://ADDR" once it accepts requests
# (after the root credentials it generated, at first start).
coproc SERVER { exec "$kiln" serve --listen "$listen" --data-dir "$data_dir"; }
server_pid=$SERVER_PID
trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null' EXIT INT TERM
started=""
while read -r -t 60 line <&"${SERVER[0]}"; do
  echo "$line"
  if [[ "$line" == "kiln listening on "* ]]; then
    started=1
    break
  fi
done
if [[ -z "$started" ]]; then
  echo "kiln did not start" >&2
  exit 1
fi
# The CLI signs with the root key the server keeps in its data dir.
export KILN_DATA_DIR="$data_dir"
endpoint="http://$listen"
for example in hello counter; do
  "$kiln" deploy "$example" "target/examples/$example.zip" --endpoint "$endpoint"
done

cat <<USAGE

kiln is running at $endpoint (data in $data_dir) with hello and counter deployed.
Requests are SigV4-signed with the root key in $data_dir/keys/root-credentials:

  export AWS_SHARED_CREDENTIALS_FILE=$data_dir/keys/root-credentials AWS_PROFILE=kiln AWS_DEFAULT_REGION=us-east-1
  kiln CLI:  KILN_DATA_DIR=$data_dir $kiln invoke hello --payload '{"name":"Ada"}' --endpoint $endpoint
             KILN_DATA_DIR=$data_dir $kiln invoke counter --endpoint $endpoint
  AWS CLI:   aws lambda invoke --endpoint-url $endpoint --function-name hello \\
               --payload '{"name":"Ada"}' response.json && cat response.json
             (AWS CLI v2 also needs --cli-binary-format raw-in-base64-out)
  curl:      curl -s --aws-sigv4 aws:amz:us-east-1:lambda --user "\$AWS_ACCESS_KEY_ID:\$AWS_SECRET_ACCESS_KEY" \\
               $endpoint/2015-03-31/functions/hello/invocations -d '{"name":"Ada"}'
             (with the two values from that file)
  console:   $endpoint/console (sign in with the two values from that file)
  logs:      KILN_DATA_DIR=$data_dir $kiln logs hello --follow --endpoint $endpoint

Press Ctrl-C to stop.
USAGE
wait "$server_pid"
