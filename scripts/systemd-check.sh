#!/usr/bin/env bash
# End-to-end check of the shipped systemd units under a real systemd (252, Debian 12).
#
# What it proves, each as a printed PASS/FAIL check (exit 0 only if all pass):
#   * systemd/alignfs@.service loads and verifies; `alignfs install-systemd demo ...`
#     writes /etc/alignfs/demo.conf + the RequiresMountsFor drop-in and enables it;
#   * `systemctl start alignfs@demo` (Type=notify) returns only once the FUSE mount
#     answers: the mount is up and `alignfs stats` works the instant start returns,
#     StatusText is "serving MOUNTPOINT", and the daemon's "mounted" log line comes
#     before systemd's "Started" line;
#   * a QEMU VM whose disk is a qcow2 on the mount (cache=none) writes and saves an
#     internal snapshot (savevm); after the stop the image on BACKING checks clean,
#     holds the snapshot and the same guest data as the same run on a plain file;
#   * clients (qemu-img/qemu-io on a qcow2, dd with an unaligned block size, and a
#     writer that keeps its file open so data is still buffered at stop time) write
#     through the mount; `systemctl stop alignfs@demo` reports STATUS=writing back ...
#     (seen in StatusText while stopping and in systemd's debug log of the notify
#     messages), exits 0, unmounts, and the backing files then equal, byte for byte
#     (sha256), the same writes done to plain files;
#   * systemd/fast.mount (renamed to its escaped mount point) verifies, mounts through
#     mount(8) + mount.fuse3, and its stop (umount(8) -> /sbin/umount.fuse.alignfs)
#     leaves every byte in BACKING;
#   * systemd/libvirtd.service.d/alignfs.conf loads onto a stub libvirtd.service:
#     starting libvirtd starts alignfs@images first (the mount is up when libvirtd
#     starts) and stopping alignfs@images stops libvirtd first;
#   * alignfs@lossy, whose daemon injects EFBIG (--fault-file) into writes of lost.img:
#     after a write there was dropped, `systemctl stop` leaves Result=exit-code,
#     ExecMainStatus=6, and the journal names the file and offset;
#   * `systemctl poweroff` with alignfs@demo running and a file still held open writes
#     everything back before systemd exits (Conflicts=/Before=umount.target).
#
# How systemd is booted (this machine's PID 1 is not systemd; cgroup v1 with a
# name=systemd hierarchy is mounted under /sys/fs/cgroup): like systemd-nspawn, by
# hand. The launcher moves itself into a new cgroup /sys/fs/cgroup/systemd/alignfs-sdtest
# (name=systemd hierarchy only; no controller hierarchy is touched), then, under
# script(1) for a pty that becomes the container's /dev/console (console log in
# $WORK/log/console.log), runs `unshare --pid --fork --mount --uts --cgroup --ipc --net`.
# Inside, before exec'ing `/lib/systemd/systemd --system --unit=sdtest.target` (a tiny
# boot target that only wants journald) with container=alignfs-test in its
# environment, the namespace's PID 1 (boot/ns-init.sh, generated below):
#   - lazily detaches its copies of the host's other mounts (the benchmark's zram/loop
#     filesystems, other FUSE mounts, the cgroup hierarchies), so it holds no device busy;
#   - mounts a fresh /proc with /proc/sys read-only, private tmpfs /run and /tmp (with
#     $WORK bound back in), a private /dev (null, zero, full, random, urandom, tty, fuse,
#     pts, shm, the pty as console), overlays over /etc and /var whose upper layers
#     live in /run (so /etc/alignfs/*.conf, enable symlinks, journal, wtmp stay inside;
#     the repo's unit files are copied into /etc/systemd/system there, overriding the
#     host's copies), masks units that would change the kernel or host state
#     (systemd-sysctl, -binfmt, -modules-load, tmpfiles, utmp, ...);
#   - mounts a tmpfs /sys/fs/cgroup with only the name=systemd hierarchy, mounted in
#     the cgroup namespace so its root is alignfs-sdtest, then makes /sys/fs/cgroup and
#     /sys read-only: systemd runs in legacy mode and can create cgroups nowhere else.
# The real / stays, so /usr/local/bin/alignfs, /opt/alignfs, qemu-* are the host's.
# journald runs with Storage=volatile. The script drives that systemd with
# `nsenter -t PID1 -a` (clients that must stay killable from here: `nsenter -m`).
# Every mount made inside dies with the namespace. The trap powers systemd off (SIGRTMIN+4,
# then SIGKILL of the namespace's PID 1 as a last resort), removes the cgroup and the data
# files; logs stay in $WORK/log (small) unless SDTEST_KEEP_LOGS=0. A final check
# compares host state (systemd-made cgroups, /dev/log, sysctls, wtmp) before and after.
#
# Usage (as root, after scripts/setup.sh install):  scripts/systemd-check.sh
# Takes about 15-20 s. Needs: util-linux (unshare, nsenter, script, findmnt), qemu-utils,
# python3, systemd (/lib/systemd/systemd, not running). Uses ~500 MB in /tmp/sdtest.
set -euo pipefail

WORK=/tmp/sdtest               # fixed: the unit configs and mount unit names use it
CG_NAME=alignfs-sdtest
CG=/sys/fs/cgroup/systemd/$CG_NAME
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNITS=$HERE/systemd
ALIGNFS=/usr/local/bin/alignfs
MB=$((1024 * 1024))
STEP=131328                    # QEMU's migration stream step: 128 KiB + 32 8-byte headers
KEEP_LOGS=${SDTEST_KEEP_LOGS:-1}

PID1=""           # host PID of the namespace's systemd
LAUNCHER=""       # host PID of the script(1) process that owns the namespace
HOLDER=""         # host PID of a writer that keeps a file open
POLLER=""
failures=0
checks=0
finished=0
t_start=$(date +%s)

say() { printf '%s\n' "$*"; }
pass() { checks=$((checks + 1)); printf 'PASS  %s\n' "$1"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); printf 'FAIL  %s\n' "$1"; [ -z "${2:-}" ] || printf '      %s\n' "$2"; }
# check NAME CMD...: run CMD (output to the check log), PASS if it succeeds.
check() {
    local name=$1; shift
    if "$@" >>"$WORK/log/checks.log" 2>&1; then pass "$name"; else fail "$name" "(command: $*; see $WORK/log/checks.log)"; fi
}
die() { printf 'systemd-check: %s\n' "$*" >&2; exit 2; }

ns() { nsenter -t "$PID1" -a -- "$@"; }        # run in the container (all namespaces)
nsm() { nsenter -t "$PID1" -m -- "$@"; }       # mount namespace only (stays killable from here)

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

wait_gone() {  # PID SECONDS
    local i
    for ((i = 0; i < $2 * 10; i++)); do alive "$1" || return 0; sleep 0.1; done
    return 1
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [ "$finished" = 1 ] || say "systemd-check: ABORTED (exit $rc) after $checks checks ($failures failed); cleaning up"
    alive "$POLLER" && kill "$POLLER" 2>/dev/null
    alive "$HOLDER" && kill "$HOLDER" 2>/dev/null
    [ -n "$PID1" ] || PID1=$(head -1 "$CG/init.scope/cgroup.procs" 2>/dev/null || true)
    if alive "$PID1"; then
        say "cleanup: powering off the container's systemd (PID $PID1)"
        timeout 10 nsenter -t "$PID1" -a -- systemctl poweroff --no-block >/dev/null 2>&1 \
            || kill -s SIGRTMIN+4 "$PID1" 2>/dev/null
        if ! wait_gone "$PID1" 60; then
            say "cleanup: systemd did not exit; killing the namespace's PID 1"
            kill -9 "$PID1" 2>/dev/null
            wait_gone "$PID1" 10
        fi
    fi
    # script(1) ends by itself once the namespace is gone (killing it earlier would
    # take the container's console away and slow its shutdown to a crawl).
    if alive "$LAUNCHER"; then
        wait_gone "$LAUNCHER" 20 || kill "$LAUNCHER" 2>/dev/null
    fi
    wait 2>/dev/null
    # systemd leaves its (now empty) sub-cgroups behind; remove them deepest first.
    if [ -d "$CG" ]; then
        find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null
        [ -d "$CG" ] && say "cleanup: WARNING: $CG still exists (processes left: $(cat "$CG/cgroup.procs" 2>/dev/null | tr '\n' ' '))"
    fi
    if grep -q " $WORK" /proc/mounts; then
        say "cleanup: WARNING: mounts left under $WORK:"; grep " $WORK" /proc/mounts
    fi
    if [ -d "$WORK" ]; then
        # Keep only the logs (small); data, backing dirs and mountpoints go.
        find "$WORK" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} + 2>/dev/null
        [ "$KEEP_LOGS" = 1 ] || rm -rf "$WORK"
    fi
    exit "$rc"
}

# -- preflight ------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root"
[ "$(cat /proc/1/comm)" != systemd ] || die "PID 1 is systemd here: this check is for machines without it"
for cmd in unshare nsenter script qemu-img qemu-io sha256sum findmnt; do
    command -v "$cmd" >/dev/null || die "missing $cmd"
done
[ -x /lib/systemd/systemd ] || die "missing /lib/systemd/systemd (apt-get install systemd)"
[ -x "$ALIGNFS" ] || die "missing $ALIGNFS (run scripts/setup.sh install)"
[ -c /dev/fuse ] || die "missing /dev/fuse"
[ -x /sbin/umount.fuse.alignfs ] || die "missing /sbin/umount.fuse.alignfs (run scripts/setup.sh install)"
findmnt -n -t cgroup /sys/fs/cgroup/systemd >/dev/null || die "no cgroup v1 name=systemd hierarchy at /sys/fs/cgroup/systemd"
[ ! -e "$CG" ] || die "$CG exists: another run is active (or remove it: find $CG -depth -type d -exec rmdir {} \\;)"
! grep -q " $WORK" /proc/mounts || die "something is mounted under $WORK"
if [ -e "$WORK" ]; then
    [ -d "$WORK/log" ] && [ -z "$(find "$WORK" -mindepth 1 -maxdepth 1 ! -name log)" ] \
        || die "$WORK exists and is not a previous run's log directory; remove it"
    rm -rf "$WORK"
fi

trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK"/{log,backing,fast,plain,backing2,fast2,backingm,fastm,plainm,etc-units,boot}
: >"$WORK/log/checks.log"
say "systemd-check: work dir $WORK, repo $HERE"

# -- what the container's systemd gets: units, boot target, namespace init ---------------
cp "$UNITS/alignfs@.service" "$WORK/etc-units/"
mkdir -p "$WORK/etc-units/libvirtd.service.d"
cp "$UNITS/libvirtd.service.d/alignfs.conf" "$WORK/etc-units/libvirtd.service.d/"
# The example mount unit, renamed and pointed at our directories (as its comment says).
MOUNT_UNIT=$(systemd-escape -p --suffix=mount "$WORK/fastm")
sed -e "s|/backing|$WORK/backingm|g" -e "s|/fast\b|$WORK/fastm|g" "$UNITS/fast.mount" \
    >"$WORK/etc-units/$MOUNT_UNIT"
# libvirt is not installed: a stub that checks the images mount is up when it starts.
cat >"$WORK/etc-units/libvirtd.service" <<EOF
[Unit]
Description=stub libvirtd (systemd-check)
DefaultDependencies=no
[Service]
ExecStartPre=/usr/bin/mountpoint -q $WORK/fast2
ExecStart=/bin/sleep infinity
EOF
cat >"$WORK/boot/sdtest.target" <<'EOF'
[Unit]
Description=alignfs systemd check (boot target)
Wants=systemd-journald.service
After=systemd-journald.service
AllowIsolate=yes
EOF
cat >"$WORK/boot/journald-sdtest.conf" <<'EOF'
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToWall=no
EOF

# Units that would change the host (kernel settings, modules, binfmt, /var, wtmp,
# static /dev nodes) are masked in the container, on top of the read-only /proc/sys
# and /sys and the private /dev, /run, /tmp, /etc and /var it gets (as with nspawn).
MASKED="systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
 proc-sys-fs-binfmt_misc.mount systemd-modules-load.service kmod-static-nodes.service
 systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.timer
 systemd-update-utmp.service systemd-update-utmp-runlevel.service systemd-remount-fs.service
 systemd-random-seed.service systemd-journal-flush.service systemd-machine-id-commit.service
 systemd-firstboot.service systemd-sysusers.service ldconfig.service systemd-hwdb-update.service
 systemd-journal-catalog-update.service systemd-update-done.service systemd-pstore.service
 dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount
 sys-kernel-config.mount sys-fs-fuse-connections.mount systemd-udevd.service
 systemd-udev-trigger.service e2scrub_reap.service"

cat >"$WORK/boot/ns-init.sh" <<EOF
#!/bin/bash
# PID 1 of the new PID namespace, before it becomes systemd.
set -euo pipefail
# Our host PID, from the host's /proc (still mounted here); read by this shell itself.
while read -r key hostpid _; do
    if [ "\$key" = NSpid: ]; then echo "\$hostpid" >$WORK/boot/pid1.tmp; fi
done </proc/self/status
mv $WORK/boot/pid1.tmp $WORK/boot/pid1
console=\$(tty)
mount --make-rprivate /
# Drop this namespace's copies of the host's other mounts (benchmark zram/loop
# filesystems, other FUSE mounts, the host's cgroup hierarchies...): holding them
# would keep their devices busy on the host, and systemd would try to unmount them.
findmnt -rn -o TARGET | grep -vE '^/(proc|sys|dev)(/|\$)|^/\$' | sort -r | while read -r m; do
    umount -l "\$m" 2>/dev/null || true
done
umount -l /sys/fs/cgroup 2>/dev/null || true
# /proc of this PID namespace; kernel settings read-only.
mount -t proc -o nosuid,nodev,noexec proc /proc
for p in /proc/sys /proc/sysrq-trigger; do
    if [ -e \$p ]; then mount --bind \$p \$p; mount -o remount,bind,ro \$p; fi
done
# Private /run and /tmp; $WORK bound back in.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir /run/sdtest-work
mount --bind $WORK /run/sdtest-work
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p $WORK
mount --move /run/sdtest-work $WORK
rmdir /run/sdtest-work
# Private /dev with the nodes the check needs (and /dev/fuse), the pty as console.
mkdir /run/sdtest-dev
mount -t tmpfs -o mode=0755,nosuid,size=1m tmpfs /run/sdtest-dev
for n in null zero full random urandom tty fuse; do
    touch /run/sdtest-dev/\$n; mount --bind /dev/\$n /run/sdtest-dev/\$n
done
mkdir /run/sdtest-dev/pts /run/sdtest-dev/shm
mount --bind /dev/pts /run/sdtest-dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /run/sdtest-dev/shm
touch /run/sdtest-dev/console; mount --bind "\$console" /run/sdtest-dev/console
ln -s pts/ptmx /run/sdtest-dev/ptmx
ln -s /proc/self/fd /run/sdtest-dev/fd
for i in 0:stdin 1:stdout 2:stderr; do ln -s /proc/self/fd/\${i%%:*} /run/sdtest-dev/\${i#*:}; done
mount --move /run/sdtest-dev /dev
rmdir /run/sdtest-dev
# Writable overlays over /etc and /var: what the container writes stays in /run.
for d in etc var; do
    mkdir -p /run/sdtest-\$d/upper /run/sdtest-\$d/work
    mount -t overlay overlay -o lowerdir=/\$d,upperdir=/run/sdtest-\$d/upper,workdir=/run/sdtest-\$d/work /\$d
done
cp -a $WORK/etc-units/. /etc/systemd/system/
for u in $(echo $MASKED); do ln -sf /dev/null /etc/systemd/system/\$u; done
mkdir -p /run/systemd/system /run/systemd/journald.conf.d
cp $WORK/boot/sdtest.target /run/systemd/system/
cp $WORK/boot/journald-sdtest.conf /run/systemd/journald.conf.d/sdtest.conf
# cgroups: only the name=systemd hierarchy, mounted in this cgroup namespace (so its
# root is $CG), then /sys read-only.
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec cgroup_root /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd
mount -t cgroup -o none,name=systemd,nosuid,nodev,noexec cgroup /sys/fs/cgroup/systemd
# Read-only from here: systemd cannot add the controller hierarchies or a cgroup2
# "unified" one (those would be rooted at the host's top-level cgroups, where it
# would create init.scope, system.slice, ...); it runs in legacy mode without them.
mount -o remount,ro,nosuid,nodev,noexec cgroup_root /sys/fs/cgroup
mount -o remount,bind,ro /sys
exec env -i container=alignfs-test TERM=vt220 \\
    /lib/systemd/systemd --system --unit=sdtest.target --show-status=yes --log-level=info
EOF
chmod +x "$WORK/boot/ns-init.sh"

# -- reference: the same client writes to plain files ------------------------------------
say "systemd-check: writing the reference files"
head -c $((40 * MB)) /dev/urandom >"$WORK/src.bin"
held_mb=192
write_clients() {  # DIR: the demo's clients (qcow2 via qemu-io, unaligned dd)
    qemu-img create -q -f qcow2 "$1/vm.qcow2" 1G
    qemu-io -f qcow2 -t none -c 'write -P 0xab 0 64M' -c 'write -P 0xcd 1000000 131328' \
        "$1/vm.qcow2" >/dev/null
    dd if="$WORK/src.bin" of="$1/dd.bin" bs=$STEP count=300 status=none
    dd if="$WORK/src.bin" of="$1/dd.bin" bs=4097 seek=1000 count=2000 conv=notrunc status=none
}
run_vm() {  # DIR: a QEMU VM with DIR/vm2.qcow2 as its disk (cache=none): the guest
    # disk is written through the monitor's qemu-io, then savevm stores an
    # internal snapshot (the motivating workload), then QEMU quits.
    qemu-img create -q -f qcow2 "$1/vm2.qcow2" 1G
    printf '%s\n' 'qemu-io d0 "write -P 0x5a 1000000 3000000"' 'savevm snap1' 'quit' |
        timeout 120 qemu-system-x86_64 -machine pc,accel=tcg -m 128 -nodefaults -display none -S \
            -drive "file=$1/vm2.qcow2,if=none,id=d0,cache=none,format=qcow2" \
            -device virtio-blk-pci,drive=d0 -monitor stdio >/dev/null
}
write_held() {  # FILE [direct]: write held_mb MiB (unaligned steps) and keep the file open
    if [ "${2:-}" = direct ]; then
        # O_DIRECT, as QEMU cache=none: the writes reach alignfs at once and stay
        # in its buffers (a page-cache writer's would wait in the kernel's cache).
        exec python3 -c 'import os, sys, time
path, src, step, mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = open(src, "rb").read(step * 255)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
for _ in range(mb // 32):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
open(path + ".written", "w").close()
time.sleep(3600)' "$1" "$WORK/src.bin" "$STEP" "$held_mb"
    fi
    exec 3>"$1"
    local i
    for ((i = 0; i < held_mb / 32; i++)); do
        dd if="$WORK/src.bin" bs=$STEP count=255 iflag=fullblock status=none >&3
    done
    touch "$1.written"
    exec sleep 3600
}
write_clients "$WORK/plain"
run_vm "$WORK/plain"
(write_held "$WORK/plain/held.bin") & ref_holder=$!
while [ ! -e "$WORK/plain/held.bin.written" ]; do sleep 0.1; done
kill "$ref_holder"; wait "$ref_holder" 2>/dev/null || true
rm "$WORK/plain/held.bin.written"
cp "$WORK/plain/dd.bin" "$WORK/plainm/dd.bin"

# What the container must not change on the host.
host_state() {
    local f
    for f in /dev/log /dev/hugepages /dev/mqueue /dev/initctl /dev/kmsg /var/lib/systemd/random-seed; do
        [ -e "$f" ] || [ -L "$f" ] && echo "exists: $f" || echo "absent: $f"
    done
    sysctl -n kernel.pid_max fs.protected_fifos fs.protected_regular fs.protected_hardlinks fs.protected_symlinks
    stat -c '%n %s %Y' /var/log/wtmp /var/log/journal 2>/dev/null || true
    ls /var/log/journal 2>/dev/null || true
    # systemd-made cgroups anywhere but in our own group
    find /sys/fs/cgroup -mindepth 2 -type d \( -name '*.scope' -o -name '*.slice' -o -name '*.service' \
        -o -name '*.mount' -o -name '*.socket' \) 2>/dev/null | grep -v "/$CG_NAME/" || true
}
host_state >"$WORK/log/host-before.txt"

# -- boot --------------------------------------------------------------------------------
say "systemd-check: booting systemd in new PID/mount/UTS/cgroup/IPC/net namespaces"
t_boot=$(date +%s.%N)
mkdir "$CG"
(
    echo "$BASHPID" >"$CG/cgroup.procs"
    exec script -qfec "unshare --pid --fork --mount --uts --cgroup --ipc --net --propagation private $WORK/boot/ns-init.sh" \
        "$WORK/log/console.log" </dev/null >/dev/null 2>&1
) &
LAUNCHER=$!
for ((i = 0; i < 100; i++)); do
    [ -s "$WORK/boot/pid1" ] && break
    alive "$LAUNCHER" || break
    sleep 0.1
done
[ -s "$WORK/boot/pid1" ] || { cat "$WORK/log/console.log" >&2 || true; die "the namespace did not start"; }
PID1=$(cat "$WORK/boot/pid1")
for ((i = 0; i < 100; i++)); do
    [ "$(cat /proc/"$PID1"/comm 2>/dev/null)" = systemd ] && [ -S "/proc/$PID1/root/run/systemd/private" ] && break
    alive "$PID1" || break
    sleep 0.1
done
[ "$(cat /proc/"$PID1"/comm 2>/dev/null)" = systemd ] \
    || { tr -d '\r' <"$WORK/log/console.log" >&2; die "systemd did not start in the namespace (console above)"; }
state=$(timeout 60 nsenter -t "$PID1" -a -- systemctl is-system-running --wait 2>&1) || true
t_booted=$(date +%s.%N)
say "systemd-check: systemd is PID $PID1 here; system state '$state' after $(elapsed "$t_boot" "$t_booted") s"
check "systemd runs as PID 1 of the namespace" test "$(ns cat /proc/1/comm)" = systemd
check "boot finished (is-system-running: $state)" test "$state" = running
check "systemd detects the container (systemd-detect-virt -c: $(ns systemd-detect-virt -c 2>&1 || true))" \
    ns systemd-detect-virt -q -c
check "journald is running" ns systemctl is-active -q systemd-journald.service
check "cgroups: only name=systemd mounted in the container; its PID 1 in $CG/init.scope" \
    test "$(grep -cE ' - cgroup2? ' "/proc/$PID1/mountinfo")/$(grep -c ":name=systemd:/$CG_NAME/init.scope\$" "/proc/$PID1/cgroup")" = 1/1
check "the container uses the repo's alignfs@.service" \
    cmp "$UNITS/alignfs@.service" "/proc/$PID1/root/etc/systemd/system/alignfs@.service"

# -- unit files load ------------------------------------------------------------------------
say "--- unit files"
ns systemd-analyze verify "/etc/systemd/system/alignfs@.service" >"$WORK/log/verify-template.log" 2>&1 \
    && pass "systemd-analyze verify alignfs@.service" \
    || fail "systemd-analyze verify alignfs@.service" "$(cat "$WORK/log/verify-template.log")"
ns systemd-analyze verify "/etc/systemd/system/$MOUNT_UNIT" >"$WORK/log/verify-mount.log" 2>&1 \
    && pass "systemd-analyze verify fast.mount (as $MOUNT_UNIT)" \
    || fail "systemd-analyze verify fast.mount (as $MOUNT_UNIT)" "$(cat "$WORK/log/verify-mount.log")"
ns systemd-analyze verify /etc/systemd/system/libvirtd.service >"$WORK/log/verify-libvirtd.log" 2>&1 \
    && pass "systemd-analyze verify stub libvirtd.service + alignfs.conf drop-in" \
    || fail "systemd-analyze verify stub libvirtd.service + alignfs.conf drop-in" "$(cat "$WORK/log/verify-libvirtd.log")"
ns systemctl cat libvirtd.service >"$WORK/log/cat-libvirtd.log" 2>&1 || true
check "systemctl cat libvirtd.service shows the alignfs.conf drop-in" \
    grep -q '^# /etc/systemd/system/libvirtd.service.d/alignfs.conf' "$WORK/log/cat-libvirtd.log"
deps=$(ns systemctl show -p Requires -p After libvirtd.service)
check "libvirtd.service Requires= and After= alignfs@images.service" \
    test "$(grep -c 'alignfs@images.service' <<<"$deps")" = 2
ns systemctl cat "$MOUNT_UNIT" >"$WORK/log/cat-mount.log" 2>&1 || true
check "systemctl cat $MOUNT_UNIT: loaded" test "$(ns systemctl show -p LoadState --value "$MOUNT_UNIT")" = loaded

# -- alignfs@demo --------------------------------------------------------------------------
say "--- alignfs@demo"
ns "$ALIGNFS" install-systemd demo "$WORK/fast" "$WORK/backing" \
    --flush-delay 600 --max-dirty 1G --buffers-per-file 48 >"$WORK/log/install-systemd.log" 2>&1 \
    && pass "alignfs install-systemd demo (inside the container)" \
    || fail "alignfs install-systemd demo" "$(cat "$WORK/log/install-systemd.log")"
check "/etc/alignfs/demo.conf written (inside only)" ns grep -qx "MOUNTPOINT=\"$WORK/fast\"" /etc/alignfs/demo.conf
check "host /etc/alignfs untouched" test ! -e /etc/alignfs/demo.conf
check "alignfs@demo.service is enabled" ns systemctl is-enabled -q alignfs@demo.service
check "drop-in adds RequiresMountsFor=$WORK/backing" \
    grep -q "$WORK/backing" <<<"$(ns systemctl show -p RequiresMountsFor alignfs@demo.service)"
DEMO_MOUNT_UNIT=$(systemd-escape -p --suffix=mount "$WORK/fast")
check "drop-in orders alignfs@demo after $DEMO_MOUNT_UNIT (stops before it unmounts)" \
    grep -qw "$DEMO_MOUNT_UNIT" <<<"$(ns systemctl show -p After alignfs@demo.service)"

t0=$(date +%s.%N)
rc=0; ns systemctl start alignfs@demo.service >"$WORK/log/start-demo.log" 2>&1 || rc=$?
# Immediately: the mount must already be up and answering.
mnt_now=$(ns findmnt -n -o FSTYPE "$WORK/fast" 2>&1 || true)
stats_now=$(ns timeout 5 "$ALIGNFS" stats "$WORK/fast" --json 2>&1 || true)
t1=$(date +%s.%N)
say "systemd-check: systemctl start alignfs@demo took $(elapsed "$t0" "$t1") s (rc $rc)"
check "systemctl start alignfs@demo exits 0" test "$rc" = 0
check "mount is fuse.alignfs the moment start returns (got '$mnt_now')" test "$mnt_now" = fuse.alignfs
check "the mount answers (alignfs stats) the moment start returns" grep -q '"pid"' <<<"$stats_now"
show=$(ns systemctl show -p Type -p ActiveState -p SubState -p StatusText -p MainPID -p NotifyAccess alignfs@demo.service)
printf '%s\n' "$show" >"$WORK/log/show-after-start.txt"
check "Type=notify, NotifyAccess=main, active (running)" \
    test "$(grep -cxE 'Type=notify|NotifyAccess=main|ActiveState=active|SubState=running' <<<"$show")" = 4
check "StatusText=serving $WORK/fast" grep -qx "StatusText=serving $WORK/fast" <<<"$show"
mainpid=$(sed -n 's/^MainPID=//p' <<<"$show")
check "MainPID ($mainpid) is the alignfs daemon" grep -q 'alignfs mount --foreground' <<<"$(ns cat "/proc/$mainpid/cmdline" | tr '\0' ' ')"
ns systemctl status --no-pager -l alignfs@demo.service >"$WORK/log/status-running.txt" 2>&1 || true
sed 's/^/      | /' "$WORK/log/status-running.txt" | head -14
# READY=1 comes after the mount: the daemon's "mounted" line precedes systemd's "Started".
ns journalctl -b -o short-monotonic --no-pager -u alignfs@demo.service >"$WORK/log/journal-start.txt" 2>&1 || true
mounted_line=$(grep -n 'mounted .* on ' "$WORK/log/journal-start.txt" | head -1 | cut -d: -f1 || true)
started_line=$(grep -n 'Started alignfs' "$WORK/log/journal-start.txt" | head -1 | cut -d: -f1 || true)
check "journal: daemon's 'mounted' line (l.${mounted_line:-?}) before 'Started' (l.${started_line:-?})" \
    test -n "$mounted_line" -a -n "$started_line" -a "${mounted_line:-0}" -lt "${started_line:-0}"

say "systemd-check: writing through $WORK/fast"
check "clients write through the mount (qemu-img, qemu-io -t none, dd bs=$STEP and bs=4097)" \
    nsm bash -c "$(declare -f write_clients); WORK=$WORK STEP=$STEP; write_clients $WORK/fast"
check "a QEMU VM runs with its disk on the mount (cache=none): guest writes, savevm" \
    nsm bash -c "$(declare -f run_vm); run_vm $WORK/fast"
nsenter -t "$PID1" -m -- bash -c "$(declare -f write_held); WORK=$WORK STEP=$STEP held_mb=$held_mb; write_held $WORK/fast/held.bin direct" &
HOLDER=$!
for ((i = 0; i < 600; i++)); do [ -e "$WORK/backing/held.bin.written" ] && break; alive "$HOLDER" || break; sleep 0.1; done
check "a writer wrote ${held_mb} MiB and keeps the file open" test -e "$WORK/backing/held.bin.written"
dirty=$(ns "$ALIGNFS" stats "$WORK/fast" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty_bytes"])' || echo 0)
say "systemd-check: buffered (dirty) before stop: $((dirty / MB)) MiB"
check "data is still buffered before the stop (dirty_bytes=$dirty)" test "$dirty" -gt $((64 * MB))

# Record StatusText while stopping; log PID1's notify messages (debug) meanwhile.
ns systemctl log-level debug
(while :; do ns systemctl show -p StatusText -p SubState alignfs@demo.service | tr '\n' ' '; echo; sleep 0.05; done) \
    >"$WORK/log/status-during-stop.txt" 2>&1 &
POLLER=$!
sleep 0.3
t0=$(date +%s.%N)
rc=0; ns systemctl stop alignfs@demo.service >"$WORK/log/stop-demo.log" 2>&1 || rc=$?
t1=$(date +%s.%N)
kill "$POLLER"; wait "$POLLER" 2>/dev/null || true; POLLER=""
ns systemctl log-level info
say "systemd-check: systemctl stop alignfs@demo took $(elapsed "$t0" "$t1") s (rc $rc)"
check "systemctl stop alignfs@demo exits 0" test "$rc" = 0
show=$(ns systemctl show -p Result -p ExecMainStatus -p ActiveState alignfs@demo.service)
check "Result=success, ExecMainStatus=0, inactive" \
    test "$(sort <<<"$show" | tr '\n' ' ')" = "ActiveState=inactive ExecMainStatus=0 Result=success "
check "StatusText showed 'writing back ...' while stopping" grep -q 'StatusText=writing back' "$WORK/log/status-during-stop.txt"
grep -o 'StatusText=[^ ]* [^ ]* [^ ]* [^ ]*\( SubState=[a-z-]*\)\?' "$WORK/log/status-during-stop.txt" | uniq | sed 's/^/      | /' || true
check "the mount is gone" test -z "$(ns findmnt -n "$WORK/fast" || true)"
kill "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null || true; HOLDER=""
rm -f "$WORK/backing/held.bin.written"
ns journalctl -b -o short-monotonic --no-pager -u alignfs@demo.service >"$WORK/log/journal-demo.txt" 2>&1 || true
check "journal: notify STATUS=writing back ... received by systemd" \
    grep -q 'Got notification message.*STATUS=writing back' "$WORK/log/journal-demo.txt"
check "journal: daemon logged 'stopping (SIGTERM)'" grep -q 'stopping (SIGTERM)' "$WORK/log/journal-demo.txt"
check "journal: 'Deactivated successfully' / 'Stopped'" grep -q 'Stopped alignfs' "$WORK/log/journal-demo.txt"
grep -E 'Started|Stopp|stopping|mounted|Got notification|Deactivated|writing|Consumed' "$WORK/log/journal-demo.txt" \
    | cut -c1-230 | sed 's/^/      | /' || true

for f in vm.qcow2 dd.bin held.bin; do
    a=$(sha256sum <"$WORK/plain/$f" | cut -c1-64); b=$(sha256sum <"$WORK/backing/$f" | cut -c1-64)
    say "      $f: plain $a"
    say "      $f: alignfs backing $b ($(stat -c %s "$WORK/backing/$f") bytes)"
    check "backing $f == plain $f (sha256)" test "$a" = "$b"
done
check "qemu-img compare backing/vm.qcow2 plain/vm.qcow2" qemu-img compare -q "$WORK/plain/vm.qcow2" "$WORK/backing/vm.qcow2"
check "the VM's disk on BACKING: qemu-img check clean" qemu-img check -q "$WORK/backing/vm2.qcow2"
check "the VM's disk on BACKING: holds snapshot snap1" grep -qw snap1 <<<"$(qemu-img snapshot -l "$WORK/backing/vm2.qcow2")"
check "the VM's disk on BACKING: same guest data as the plain run (qemu-img compare)" \
    qemu-img compare -q "$WORK/plain/vm2.qcow2" "$WORK/backing/vm2.qcow2"

# -- fast.mount -------------------------------------------------------------------------------
say "--- fast.mount as $MOUNT_UNIT"
ns systemctl start "$MOUNT_UNIT" >"$WORK/log/start-mount.log" 2>&1 \
    && pass "systemctl start $MOUNT_UNIT" || fail "systemctl start $MOUNT_UNIT" "$(cat "$WORK/log/start-mount.log")"
check "$WORK/fastm is fuse.alignfs" test "$(ns findmnt -n -o FSTYPE "$WORK/fastm" || true)" = fuse.alignfs
check "dd bs=$STEP through $WORK/fastm" nsm dd if="$WORK/src.bin" of="$WORK/fastm/dd.bin" bs=$STEP count=300 status=none
nsm dd if="$WORK/src.bin" of="$WORK/fastm/dd.bin" bs=4097 seek=1000 count=2000 conv=notrunc status=none
ns systemctl stop "$MOUNT_UNIT" >"$WORK/log/stop-mount.log" 2>&1 \
    && pass "systemctl stop $MOUNT_UNIT (umount.fuse.alignfs)" || fail "systemctl stop $MOUNT_UNIT" "$(cat "$WORK/log/stop-mount.log")"
check "$WORK/fastm unmounted" test -z "$(ns findmnt -n "$WORK/fastm" || true)"
check "no alignfs daemon left for $WORK/fastm" test -z "$(ns pgrep -f "alignfs.*$WORK/fastm" || true)"
check "backingm/dd.bin == plain (sha256)" cmp "$WORK/plainm/dd.bin" "$WORK/backingm/dd.bin"
ns journalctl -b --no-pager -u "$MOUNT_UNIT" >"$WORK/log/journal-mount.txt" 2>&1 || true

# -- libvirtd drop-in ordering --------------------------------------------------------------
say "--- libvirtd.service.d/alignfs.conf (stub libvirtd, instance 'images')"
ns "$ALIGNFS" install-systemd images "$WORK/fast2" "$WORK/backing2" >>"$WORK/log/install-systemd.log" 2>&1
ns systemctl start libvirtd.service >"$WORK/log/start-libvirtd.log" 2>&1 \
    && pass "systemctl start libvirtd (stub; its ExecStartPre requires $WORK/fast2 mounted)" \
    || fail "systemctl start libvirtd" "$(cat "$WORK/log/start-libvirtd.log")"
check "alignfs@images was pulled in and is active" ns systemctl is-active -q alignfs@images.service
ns systemctl stop alignfs@images.service >"$WORK/log/stop-images.log" 2>&1 \
    && pass "systemctl stop alignfs@images" || fail "systemctl stop alignfs@images" "$(cat "$WORK/log/stop-images.log")"
check "libvirtd was stopped with it" test "$(ns systemctl is-active libvirtd.service || true)" = inactive
ns journalctl -b -o short-monotonic --no-pager -u libvirtd.service -u alignfs@images.service >"$WORK/log/journal-libvirtd.txt" 2>&1 || true
stopped_libvirtd=$(grep -n 'Stopped libvirtd.service' "$WORK/log/journal-libvirtd.txt" | head -1 | cut -d: -f1 || true)
stopping_images=$(grep -n 'stopping (SIGTERM)' "$WORK/log/journal-libvirtd.txt" | head -1 | cut -d: -f1 || true)
check "libvirtd stopped (l.${stopped_libvirtd:-?}) before alignfs@images began its write-back (l.${stopping_images:-?})" \
    test -n "$stopped_libvirtd" -a -n "$stopping_images" -a "${stopped_libvirtd:-0}" -lt "${stopping_images:-0}"

# -- paths with spaces, quotes and '%' ----------------------------------------------------------
say "--- alignfs@odd: MOUNTPOINT and BACKING with spaces, a quote and '%'"
ODD_MNT="$WORK/fast odd's 100%"
ODD_BACK="$WORK/backing odd"
mkdir -p "$ODD_MNT" "$ODD_BACK"
ns "$ALIGNFS" install-systemd odd "$ODD_MNT" "$ODD_BACK" --buffer-size 1M \
    >>"$WORK/log/install-systemd.log" 2>&1 \
    && pass "alignfs install-systemd odd" || fail "alignfs install-systemd odd" "$(tail -3 "$WORK/log/install-systemd.log")"
ODD_UNIT=$(systemd-escape -p --suffix=mount "$ODD_MNT")
ns systemctl start alignfs@odd.service >"$WORK/log/start-odd.log" 2>&1 \
    && pass "systemctl start alignfs@odd" || fail "systemctl start alignfs@odd" "$(cat "$WORK/log/start-odd.log")"
check "'$ODD_MNT' is fuse.alignfs" test "$(ns findmnt -n -o FSTYPE "$ODD_MNT" || true)" = fuse.alignfs
odd_requires=$(ns systemctl show -p RequiresMountsFor --value alignfs@odd.service)
odd_after=$(ns systemctl show -p After --value alignfs@odd.service)
printf 'alignfs@odd RequiresMountsFor=%s\nalignfs@odd After=%s\n' "$odd_requires" "$odd_after" \
    >>"$WORK/log/checks.log"
# systemctl show quotes a value holding spaces or backslashes (and doubles the latter).
check "alignfs@odd: RequiresMountsFor='$ODD_BACK'" test "$odd_requires" = "\"$ODD_BACK\""
check "alignfs@odd: After=$ODD_UNIT" grep -qF -- "\"${ODD_UNIT//\\/\\\\}\"" <<<"$odd_after"
check "dd bs=$STEP through '$ODD_MNT'" nsm dd if="$WORK/src.bin" of="$ODD_MNT/dd.bin" bs=$STEP count=300 status=none
ns systemctl stop alignfs@odd.service >"$WORK/log/stop-odd.log" 2>&1 \
    && pass "systemctl stop alignfs@odd" || fail "systemctl stop alignfs@odd" "$(cat "$WORK/log/stop-odd.log")"
check "'$ODD_BACK/dd.bin' == the first $((300 * STEP)) bytes written" \
    cmp -n $((300 * STEP)) "$WORK/src.bin" "$ODD_BACK/dd.bin"

# -- a write that could never be written: stop must not report success -------------------------
say "--- alignfs@lossy: a write dropped for good (injected EFBIG); systemctl stop reports it"
mkdir -p "$WORK/fastl" "$WORK/backingl"
printf '{"write": "EFBIG", "match": "lost"}' >"$WORK/faults.json"
ns "$ALIGNFS" install-systemd lossy "$WORK/fastl" "$WORK/backingl" --flush-delay 600 \
    --fault-file "$WORK/faults.json" >>"$WORK/log/install-systemd.log" 2>&1 \
    && pass "alignfs install-systemd lossy (--fault-file: writes of 'lost*' fail with EFBIG)" \
    || fail "alignfs install-systemd lossy" "$(tail -3 "$WORK/log/install-systemd.log")"
ns systemctl start alignfs@lossy.service >"$WORK/log/start-lossy.log" 2>&1 \
    && pass "systemctl start alignfs@lossy" || fail "systemctl start alignfs@lossy" "$(cat "$WORK/log/start-lossy.log")"
LOST_AT=$((1024 * MB + 123))
# The last close starts the write-out, which drops the data; then the stop.
check "a client writes lost.img at offset $LOST_AT and closes it" \
    nsm python3 -c "import os; fd = os.open('$WORK/fastl/lost.img', os.O_WRONLY | os.O_CREAT, 0o644); os.pwrite(fd, b'L' * 3000, $LOST_AT); os.close(fd)"
for ((i = 0; i < 100; i++)); do
    ns journalctl -b --no-pager -u alignfs@lossy.service 2>/dev/null | grep -q 'can never be written' && break
    sleep 0.1
done
ns systemctl stop alignfs@lossy.service >"$WORK/log/stop-lossy.log" 2>&1 || true
show=$(ns systemctl show -p Result -p ExecMainStatus alignfs@lossy.service)
check "stopped alignfs@lossy: Result=exit-code, ExecMainStatus=6 (got: $(tr '\n' ' ' <<<"$show"))" \
    test "$(sort <<<"$show" | tr '\n' ' ')" = "ExecMainStatus=6 Result=exit-code "
ns journalctl -b --no-pager -u alignfs@lossy.service >"$WORK/log/journal-lossy.txt" 2>&1 || true
# The kernel's writeback cache sends the page that holds LOST_AT, from its start.
LOST_PAGE=$((LOST_AT - LOST_AT % 4096))
check "journal: at the stop, the daemon names lost.img and offset $LOST_PAGE" \
    grep -q "lost.img: not on BACKING at unmount: .*offset $LOST_PAGE" "$WORK/log/journal-lossy.txt"
check "$WORK/fastl unmounted" test -z "$(ns findmnt -n "$WORK/fastl" || true)"
ns systemctl reset-failed alignfs@lossy.service >/dev/null 2>&1 || true

# -- poweroff with alignfs@demo running -------------------------------------------------------
say "--- systemctl poweroff with alignfs@demo running and a file held open"
rm -f "$WORK/backing/held.bin"
ns systemctl start alignfs@demo.service
nsenter -t "$PID1" -m -- bash -c "$(declare -f write_held); WORK=$WORK STEP=$STEP held_mb=$held_mb; write_held $WORK/fast/held.bin direct" &
HOLDER=$!
for ((i = 0; i < 600; i++)); do [ -e "$WORK/backing/held.bin.written" ] && break; alive "$HOLDER" || break; sleep 0.1; done
rm -f "$WORK/backing/held.bin.written"
check "sysinit.target was never started in the container" \
    test "$(ns systemctl show -p ActiveEnterTimestampMonotonic --value sysinit.target)" = 0
ns journalctl -b --no-pager >"$WORK/log/journal-before-poweroff.txt" 2>&1 || true
t0=$(date +%s.%N)
ns systemctl poweroff >/dev/null 2>&1 || true
wait_gone "$PID1" 120 && pass "systemd powered off" || fail "systemd powered off (PID $PID1 still alive after 120 s)"
t1=$(date +%s.%N)
say "systemd-check: poweroff took $(elapsed "$t0" "$t1") s"
kill "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null || true; HOLDER=""
wait_gone "$LAUNCHER" 10 || true
PID1=""
check "after poweroff: backing held.bin == plain held.bin (sha256)" cmp "$WORK/plain/held.bin" "$WORK/backing/held.bin"
grep -E 'alignfs|Reached target|Stopp|Power' "$WORK/log/console.log" | tr -d '\r' | tail -12 | sed 's/^/      | /' || true
check "console: alignfs@demo stopped during shutdown" grep -q 'Stopped.*alignfs@demo' "$WORK/log/console.log"
sed -e 's/\x1b\[[0-9;]*m//g' -e 's/\r//g' "$WORK/log/console.log" >"$WORK/log/console.txt"
stopped_demo=$(grep -n 'Stopped alignfs@demo' "$WORK/log/console.txt" | tail -1 | cut -d: -f1 || true)
unmounting_fast=$(grep -n "Unmounting $DEMO_MOUNT_UNIT" "$WORK/log/console.txt" | tail -1 | cut -d: -f1 || true)
check "shutdown: $DEMO_MOUNT_UNIT not unmounted (l.${unmounting_fast:-none}) before alignfs@demo stopped (l.${stopped_demo:-?})" \
    test -n "$stopped_demo" -a "${unmounting_fast:-999999}" -gt "${stopped_demo:-0}"
check "no FUSE mount of ours on the host" test -z "$(grep " $WORK" /proc/mounts || true)"
host_state >"$WORK/log/host-after.txt"
check "host cgroups (outside $CG), /dev/{log,hugepages,mqueue,...}, kernel.pid_max, fs.protected_*, wtmp, /var/log/journal unchanged" \
    diff "$WORK/log/host-before.txt" "$WORK/log/host-after.txt"

t_end=$(date +%s)
say ""
say "systemd-check: $((checks - failures))/$checks checks passed in $((t_end - t_start)) s; logs in $WORK/log"
finished=1
[ "$failures" -eq 0 ]
