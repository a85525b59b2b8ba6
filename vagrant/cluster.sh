#!/usr/bin/env bash
# The Vagrant multi-VM cluster, from the host: `./dev vagrant up|test|down|status` run this.
#
#   up      install what is missing (Debian: vagrant, vagrant-libvirt, libvirt, qemu, debootstrap),
#           build the box (once) and the wheels, write the cluster configuration (dfs init),
#           start libvirt in the network namespace dfs-vagrant, and bring up DFS_VAGRANT_NODES VMs
#           (default 3), each running dfs under systemd with /mnt/dfs mounted
#   test    run vagrant/vmtest.py against the VMs; its last line is "N passed, N failed"
#   down    destroy the VMs, their networks and storage, stop libvirt, remove the namespace
#   status  show the VMs
#
# Everything lives under DFS_VAGRANT_DIR (default /var/tmp/dfs-vagrant); `down` keeps only the
# box (dfs-bookworm.box and vagrant.d/) and the package downloads for the next `up`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VDIR=${DFS_VAGRANT_DIR:-/var/tmp/dfs-vagrant}
NS=dfs-vagrant
N=${DFS_VAGRANT_NODES:-3}
DEB_PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils
  dnsmasq-base iptables debootstrap extlinux syslinux-common fdisk e2fsprogs)
export DFS_VAGRANT_DIR=$VDIR DFS_VAGRANT_NODES=$N
export VAGRANT_HOME=$VDIR/vagrant.d VAGRANT_DOTFILE_PATH=$VDIR/dotfile VAGRANT_CWD=$ROOT/vagrant
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
export VAGRANT_DEFAULT_PROVIDER=libvirt LIBVIRT_DEFAULT_URI=qemu:///system
PY=$ROOT/.venv/bin/python

say() { printf '==> vagrant: %s (%s)\n' "$*" "$(date +%H:%M:%S)" >&2; }
in_ns() { ip netns exec "$NS" "$@"; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# libvirt as root with no systemd: run it by hand in our namespace, with a qemu.conf of our own
# bound over the system's in a private mount namespace (`ip netns exec` remounts /sys and hides
# the cgroup file systems; nothing here may change the host's configuration).
start_libvirt() {
  mkdir -p "$VDIR/run" "$VDIR/pool"
  ip netns list | grep -qw "^$NS" || { say "creating network namespace $NS"; ip netns add "$NS"; }
  in_ns ip link set lo up
  cat > "$VDIR/qemu.conf" <<CONF
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
CONF
  cat > "$VDIR/qemu-tcg" <<'WRAP'
#!/bin/sh
# qemu with TCG's translation cache capped at 256 MiB (default 1 GiB per VM).
for a in "$@"; do
  if [ "$prev" = "-accel" ] && [ "$a" = "tcg" ]; then a="tcg,tb-size=256"; fi
  set -- "$@" "$a"; shift; prev=$a
done
exec /usr/bin/qemu-system-x86_64 "$@"
WRAP
  chmod +x "$VDIR/qemu-tcg"
  if ! running "$VDIR/run/virtlogd.pid"; then
    in_ns virtlogd -d -p "$VDIR/run/virtlogd.pid"
  fi
  if ! running "$VDIR/run/libvirtd.pid"; then
    say "starting libvirtd in namespace $NS"
    in_ns unshare --mount --propagation private sh -c \
      "mount --bind '$VDIR/qemu.conf' /etc/libvirt/qemu.conf && exec libvirtd -d -p '$VDIR/run/libvirtd.pid'"
  fi
  for _ in $(seq 150); do virsh -q version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -q version >/dev/null
  # Networks that Debian's libvirt defines (and may autostart) have no business here.
  for net in $(virsh -q net-list --name); do
    case "$net" in dfs-vagrant-*) ;; *) virsh -q net-destroy "$net" >/dev/null ;; esac
  done
  if ! virsh -q pool-info dfs-vagrant >/dev/null 2>&1; then
    virsh -q pool-define-as dfs-vagrant dir --target "$VDIR/pool" >/dev/null
  fi
  virsh -q pool-info dfs-vagrant | grep -q running || virsh -q pool-start dfs-vagrant >/dev/null
}

stop_libvirt() {
  if running "$VDIR/run/libvirtd.pid"; then
    for dom in $(virsh -q list --all --name | grep '^dfs-' || true); do
      virsh -q destroy "$dom" >/dev/null 2>&1 || true
      virsh -q undefine "$dom" --remove-all-storage >/dev/null 2>&1 || true
    done
    for net in $(virsh -q net-list --all --name); do
      virsh -q net-destroy "$net" >/dev/null 2>&1 || true
      case "$net" in dfs-vagrant-*) virsh -q net-undefine "$net" >/dev/null 2>&1 || true ;; esac
    done
    if virsh -q pool-info dfs-vagrant >/dev/null 2>&1; then
      for vol in $(virsh -q vol-list dfs-vagrant | awk '{print $1}'); do
        virsh -q vol-delete "$vol" --pool dfs-vagrant >/dev/null 2>&1 || true
      done
      virsh -q pool-destroy dfs-vagrant >/dev/null 2>&1 || true
      virsh -q pool-undefine dfs-vagrant >/dev/null 2>&1 || true
    fi
  fi
  local f pid
  for f in libvirtd virtlogd; do
    if running "$VDIR/run/$f.pid"; then
      pid=$(cat "$VDIR/run/$f.pid")
      say "stopping $f (pid $pid)"
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$VDIR/run/$f.pid"
  done
  if ip netns list | grep -qw "^$NS"; then
    # What is left in the namespace was started by us (dnsmasq, qemu): end it by pid.
    for pid in $(ip netns pids "$NS"); do
      say "ending leftover process $pid ($(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-60))"
      kill -9 "$pid" 2>/dev/null || true
    done
    ip netns del "$NS"
  fi
}

build_payload() {
  say "building wheels and the cluster configuration"
  rm -rf "$VDIR/payload"
  mkdir -p "$VDIR/payload/deploy"
  DFS_PYTHON=$PY deploy/build-wheels.sh "$VDIR/payload/wheels" 2>/dev/null
  local specs=()
  for i in $(seq "$N"); do specs+=("n$i=198.18.11.$((10 + i)):7800"); done
  "$ROOT/.venv/bin/dfs" init "${specs[@]}" --name vagrant --config "$VDIR/payload/cluster.toml" >/dev/null
  cp deploy/install-node.sh deploy/dfs-mountd@.service "$VDIR/payload/deploy/"
  tar -C "$VDIR/payload" -cf "$VDIR/payload.tar" .
}

up() {
  install_packages
  if [ ! -f "$VDIR/dfs-bookworm.box" ] || [ vagrant/build-box.sh -nt "$VDIR/dfs-bookworm.box" ]; then
    say "building the box (once; again when vagrant/build-box.sh changes)"
    vagrant/build-box.sh
  fi
  start_libvirt
  if [ ! -f "$VDIR/box-added" ] || [ "$VDIR/dfs-bookworm.box" -nt "$VDIR/box-added" ]; then
    say "adding the box"
    vagrant box add --force --name dfs-bookworm "$VDIR/dfs-bookworm.box" >/dev/null
    touch "$VDIR/box-added"
  fi
  build_payload
  say "bringing up $N VMs (accel ${DFS_VAGRANT_ACCEL:-tcg}); output in $VDIR/up.log"
  if ! in_ns vagrant up --provider libvirt > "$VDIR/up.log" 2>&1; then
    tail -40 "$VDIR/up.log" >&2
    echo "vagrant: 'vagrant up' failed; see $VDIR/up.log; './dev vagrant down' cleans up" >&2
    exit 1
  fi
  vagrant ssh-config > "$VDIR/ssh_config"
  for i in $(seq "$N"); do
    in_ns ssh -F "$VDIR/ssh_config" "n$i" findmnt -n -o SOURCE,TARGET,FSTYPE /mnt/dfs >&2 2>/dev/null || true
  done | sed 's/^/    /' >&2
  say "up: ${N} VMs with dfs mounted at /mnt/dfs; try: ./dev vagrant test"
}

run_test() {
  [ -f "$VDIR/ssh_config" ] || { echo "vagrant: no VMs (run ./dev vagrant up)" >&2; exit 1; }
  in_ns python3 vagrant/vmtest.py --ssh-config "$VDIR/ssh_config" --nodes "$N"
}

down() {
  if running "$VDIR/run/libvirtd.pid" && [ -d "$VDIR/dotfile" ]; then
    say "destroying the VMs"
    in_ns vagrant destroy -f > "$VDIR/down.log" 2>&1 || true
  fi
  stop_libvirt
  rm -rf "$VDIR/dotfile" "$VDIR/ssh_config" "$VDIR/pool" "$VDIR/payload" "$VDIR/payload.tar" "$VDIR/run"
  say "down: no VM, network, namespace or process left"
}

case "${1:-}" in
  up) up ;;
  test) run_test ;;
  down) down ;;
  status) running "$VDIR/run/libvirtd.pid" && in_ns vagrant status || echo "no VMs" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
