#!/usr/bin/env bash
# Run the whole test suite. The suite drives real SMTP peers (swaks,
# Python's smtplib, Postfix's smtp-sink and smtp-source) and a real DNS
# server (Knot, for MX routing); when one is
# missing and we may install packages, install it from Debian first.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v swaks >/dev/null || need+=(swaks)
{ command -v smtp-sink || [ -x /usr/sbin/smtp-sink ]; } >/dev/null || need+=(postfix)
command -v python3 >/dev/null || need+=(python3)
{ command -v knotd || [ -x /usr/sbin/knotd ]; } >/dev/null || need+=(knot)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing test peers: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
exec cargo test --all-targets
