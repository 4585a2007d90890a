#!/usr/bin/env bash
# From a fresh Debian 12 host to a running VM and its console: installs packages, builds the
# test images, starts libvirtd, builds and starts vmhost with its embedded defaults, boots a
# demo VM and follows its serial console. Run as root: sudo ./scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash images/build-images.sh
bash scripts/start-libvirt.sh
cargo build --release --quiet
vmhost=target/release/vmhost
url=http://127.0.0.1:8080
mkdir -p /var/lib/vmhost
if ! curl -s -o /dev/null "$url/api/jobs/retrieveProducts"; then
  nohup "$vmhost" serve >>/var/lib/vmhost/vmhost.log 2>&1 &
  echo "vmhost started (pid $!), log: /var/lib/vmhost/vmhost.log"
  for _ in $(seq 1 600); do
    curl -s -o /dev/null "$url/api/jobs/retrieveProducts" && break
    sleep 0.2
  done
fi
token=$(cat /var/lib/vmhost/user-token)
key="$HOME/.ssh/vmhost_demo"
[ -f "$key" ] || { mkdir -p "$HOME/.ssh"; ssh-keygen -q -t ed25519 -N '' -C vmhost-demo -f "$key"; }
body=$(jq -n --arg key "$(cat "$key.pub")" '{items: [{
  application: {name: "debian-cloud", version: "12"},
  product: {id: "vm-small", category: "vm", provider: "vmhost"},
  name: "demo", replicas: 1, allowDuplicateJob: true,
  parameters: {sshPublicKeys: {type: "text", value: $key}},
  resources: null, timeAllocation: null, openedFile: null, restartOnExit: null}]}')
id=$(curl -sf -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  "$url/api/jobs" -d "$body" | jq -r '.responses[0].id')
for _ in $(seq 1 300); do
  state=$(curl -sf -H "Authorization: Bearer $token" "$url/api/jobs/retrieve?id=$id" | jq -r .status.state)
  [ "$state" = RUNNING ] && break
  [ "$state" = FAILURE ] && { echo "job $id failed; see /var/lib/vmhost/vmhost.log" >&2; exit 1; }
  sleep 0.5
done
vnc=$(curl -sf -H "Authorization: Bearer $token" -H 'Content-Type: application/json' "$url/api/jobs/interactiveSession" \
  -d "{\"items\":[{\"id\":\"$id\",\"rank\":0,\"sessionType\":\"VNC\"}]}" | jq -r '.responses[0].session.url')
private=
for _ in $(seq 1 20); do  # the address update follows RUNNING by a few milliseconds
  private=$(curl -sf -H "Authorization: Bearer $token" "$url/api/jobs/retrieve?id=$id&includeUpdates=true" |
    jq -r '[.updates[].status // "" | capture("private address (?<a>[0-9.]+)").a] | first // empty')
  [ -n "$private" ] && break
  sleep 0.1
done
echo "Job $id is RUNNING. Its screen in a browser (link valid for 60 s, once):"
echo "  $url/console?token=${vnc##*token=}"
[ -n "$private" ] && echo "Once it has booted: ssh -i $key debian@$private   (vmhost's private network)"
echo "Its serial console follows here (about 1-2 minutes to the login prompt under TCG)."
echo "Ctrl-C leaves the console; the VM keeps running. Terminate it with:"
echo "  curl -H \"Authorization: Bearer \$(cat /var/lib/vmhost/user-token)\" -H 'Content-Type: application/json' $url/api/jobs/terminate -d '{\"items\":[{\"id\":\"$id\"}]}'"
exec "$vmhost" console "$id" --url "$url" --token "$token"
