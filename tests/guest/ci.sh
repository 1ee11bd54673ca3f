#!/usr/bin/env bash
# Install what the guest tier needs and prepare the guest image (kernel + initramfs),
# so that tests/test_guest_tier.py runs in the following pytest instead of skipping.
# Idempotent and cached (/var/cache/udamon-guest).  Root: apt-get install.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
if ! command -v qemu-system-x86_64 >/dev/null; then
  apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-system-x86; }
fi
python3 tests/guest/prepare.py
