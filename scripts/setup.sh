#!/usr/bin/env bash
# Set up alignfs on Debian 12 (as root) and run the demo or the test suite.
#
#   scripts/setup.sh            install only
#   scripts/setup.sh demo       install, then run the side-by-side benchmark demo
#   scripts/setup.sh test       install, then run the whole test suite
#
# Installs the Debian packages alignfs and its tests need, builds a virtualenv
# in /opt/alignfs/venv (pyfuse3 has no wheels: it compiles against libfuse3),
# installs this checkout into it and links /usr/local/bin/alignfs, so mount(8),
# systemd and a user's shell all find the command. Safe to run again.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${ALIGNFS_PREFIX:-/opt/alignfs}
mode=${1:-install}

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and mounts filesystems)" >&2
    exit 2
fi

packages=(fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev
          qemu-utils qemu-system-x86 fio acl libcap2-bin e2fsprogs util-linux bsdutils procps
          systemd kmod)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

if [ ! -x "$prefix/venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$prefix/venv"
fi
# Extras: test (pytest, ...), plot (matplotlib, for "alignfs bench --plot").
"$prefix/venv/bin/python" -m pip install -q --disable-pip-version-check "$here[test,plot]" </dev/null
ln -sf "$prefix/venv/bin/alignfs" /usr/local/bin/alignfs
# systemd template unit and the umount(8) helper that makes "umount /fast" wait
# for write-back (see README "Running as a service").
install -d /etc/systemd/system "$prefix/share"
install -m 0644 "$here/systemd/alignfs@.service" /etc/systemd/system/alignfs@.service
cp -r "$here/systemd" "$prefix/share/"
install -m 0755 "$here/systemd/umount.fuse.alignfs" /sbin/umount.fuse.alignfs
[ -d /run/systemd/system ] && systemctl daemon-reload || true
echo "setup.sh: alignfs installed: $(command -v alignfs)"

case "$mode" in
    install) ;;
    demo)
        exec /usr/local/bin/alignfs bench --demo ;;
    test)
        cd "$here"
        exec "$prefix/venv/bin/python" -m pytest -p no:cacheprovider "${@:2}" ;;
    *)
        echo "setup.sh: unknown mode '$mode' (install, demo or test)" >&2
        exit 2 ;;
esac
