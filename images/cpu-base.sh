#!/usr/bin/env bash
# A Debian bookworm base image built locally with mmdebstrap + docker import, for machines that reach no
# container registry (the CPU image's BASE_IMAGE there). It trusts the host's locally added CA certificates,
# so pip inside the build reaches the package index through the same TLS proxy the host uses.
set -euo pipefail
IMAGE=${1:-llmbox/base:bookworm}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then echo "$IMAGE exists"; exit 0; fi
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
  m=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/debian.sources | grep -v security | head -1 || true)
  s=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/debian.sources | grep security | head -1 || true)
  MIRROR=${m:-$MIRROR}; SECURITY=${s:-$SECURITY}
fi
hooks=()
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  hooks+=(--customize-hook='sync-in /usr/local/share/ca-certificates /usr/local/share/ca-certificates'
          --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1')
fi
mmdebstrap --quiet --variant=minbase --include=ca-certificates \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  "${hooks[@]}" \
  --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" >"$1/etc/pip.conf"' \
  --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
  bookworm - "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main" \
| docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "built $IMAGE"
