#!/usr/bin/env bash
# Debian packages some tests use: chromium (the browser-facing pages), tshark (decrypting a captured
# tunnel session with the key log), openssh-server (`access ssh` to a real sshd), traceroute (the
# network jobs of `tunnel diag`, which run traceroute and traceroute6). Without them those tests skip
# and say which package they miss. Needs root and apt-get; does nothing otherwise.
set -uo pipefail
packages=(chromium tshark openssh-server traceroute)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: not root or no apt-get: ${packages[*]} not installed (their tests skip)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "${packages[@]}" >/tmp/tunnel-lab-apt.log 2>&1; }
if install || { apt-get update -q >>/tmp/tunnel-lab-apt.log 2>&1 && install; }; then
  echo "system-deps: ${packages[*]} installed"
else
  echo "system-deps: apt-get failed (see /tmp/tunnel-lab-apt.log): their tests skip"
fi
exit 0
