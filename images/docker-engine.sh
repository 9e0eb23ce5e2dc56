#!/usr/bin/env bash
# Make a Docker engine answer on this (Debian) machine: install docker.io, and start dockerd without a bridge
# network or iptables rules, if none is running. Containers use the host's network. Idempotent; needs root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null; then
  # never let the package start a daemon with the default docker0 bridge
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_created=1; fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io mmdebstrap >/dev/null
  if [ "$policy_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
if ! docker info >/dev/null 2>&1; then
  setsid dockerd --bridge=none --iptables=false >/tmp/llmbox-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/llmbox-dockerd.log; echo "dockerd did not come up" >&2; exit 1; }
fi
echo "docker engine $(docker version -f '{{.Server.Version}}') answers"
# CLI plugins from Debian trixie's packages (extracted only, the system's package sources untouched): compose v2,
# which Debian 12's docker.io lacks, and buildx, without which a newer docker CLI than docker.io's (some machines
# ship one in /usr/local/bin) refuses to build with BuildKit
PLUGINS=/usr/local/lib/docker/cli-plugins
trixie_plugin() {  # trixie_plugin PACKAGE PLUGIN
  local work mirror
  work=$(mktemp -d)
  mirror=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -1 || true)
  mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/x"
  echo "deb ${mirror:-http://deb.debian.org/debian} trixie main" >"$work/sources.list"
  local opts=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::lists="$work/lists"
        -o Dir::Cache::archives="$work/archives" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
        -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq
  (cd "$work/archives" && apt-get "${opts[@]}" download "$1" >/dev/null)
  dpkg -x "$work"/archives/"$1"_*.deb "$work/x"
  install -D -m 0755 "$work/x/usr/libexec/docker/cli-plugins/$2" "$PLUGINS/$2"
  rm -rf "$work"
}
docker compose version >/dev/null 2>&1 || trixie_plugin docker-compose docker-compose
echo "$(docker compose version)"
docker buildx version >/dev/null 2>&1 || trixie_plugin docker-buildx docker-buildx
echo "buildx $(docker buildx version)"
