#!/usr/bin/env bash
# Build the Debian bookworm Vagrant box for vagrant/ offline from Debian packages (no box download).
#
#   vagrant/build-box.sh            (as root) writes $DFS_VAGRANT_DIR/dfs-bookworm.box
#
# debootstrap a minimal system with what a dfs node needs (systemd, sshd, fuse3, python3-venv),
# copy it into an ext4 partition of a raw disk through a loop device, make it bootable with
# extlinux, convert it to qcow2 and pack it as a vagrant-libvirt box. The box has the user
# `vagrant` with Vagrant's well-known insecure key and password-less sudo, DHCP on eth0, and
# fresh ssh host keys made on first boot. Only Debian's archive is reached.
set -euo pipefail
VDIR=${DFS_VAGRANT_DIR:-/var/tmp/dfs-vagrant}
MIRROR=${DFS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BOX="$VDIR/dfs-bookworm.box"
WORK="$VDIR/box-build"
DISK_MB=${DFS_BOX_DISK_MB:-3072}
PACKAGES=(linux-image-amd64 initramfs-tools systemd systemd-sysv udev dbus kmod iproute2
  iputils-ping procps openssh-server sudo fuse3 python3 python3-venv e2fsprogs psmisc)
VAGRANT_KEY=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1)

say() { printf '==> build-box: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "build-box: run it as root" >&2; exit 1; }
[ -n "$VAGRANT_KEY" ] || { echo "build-box: vagrant's insecure key not found (install vagrant)" >&2; exit 1; }

LOOP=""
cleanup() {
  set +e
  for m in "$WORK/mnt/dev" "$WORK/mnt/proc" "$WORK/mnt/sys" "$WORK/mnt"; do
    mountpoint -q "$m" && umount "$m"
  done
  [ -n "$LOOP" ] && losetup -d "$LOOP"
}
trap cleanup EXIT

rm -rf "$WORK"
mkdir -p "$WORK/root" "$WORK/mnt"
say "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" bookworm "$WORK/root" "$MIRROR" \
  > "$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log" >&2; exit 1; }

say "configuring the guest"
R="$WORK/root"
echo dfs-box > "$R/etc/hostname"
printf '127.0.0.1 localhost\n' > "$R/etc/hosts"
mkdir -p "$R/etc/systemd/network"
# DHCP by MAC: every VM starts from the same image, so a machine-id based DUID would hand them
# all one address.
printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n\n[DHCPv4]\nClientIdentifier=mac\n' \
  > "$R/etc/systemd/network/10-eth0.network"
chroot "$R" systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1
chroot "$R" systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
chroot "$R" useradd -m -s /bin/bash vagrant
install -d -m 700 -o 1000 -g 1000 "$R/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$VAGRANT_KEY" "$R/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$R/etc/sudoers.d/vagrant"
chmod 440 "$R/etc/sudoers.d/vagrant"
printf 'UseDNS no\n' > "$R/etc/ssh/sshd_config.d/vagrant.conf"
# Each VM gets its own host keys on first boot, made before sshd's own config test.
rm -f "$R"/etc/ssh/ssh_host_*
mkdir -p "$R/etc/systemd/system/ssh.service.d"
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
  > "$R/etc/systemd/system/ssh.service.d/host-keys.conf"
# Each VM makes its own machine-id on first boot.
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*

say "making a ${DISK_MB} MiB bootable disk"
RAW="$WORK/disk.raw"
truncate -s "${DISK_MB}M" "$RAW"
echo 'start=2048, type=83, bootable' | sfdisk -q "$RAW"
LOOP=$(losetup --find --show --offset $((2048 * 512)) "$RAW")
mkfs.ext4 -q -L root "$LOOP"
UUID=$(blkid -s UUID -o value "$LOOP")
mount "$LOOP" "$WORK/mnt"
tar -C "$R" --xattrs --xattrs-include='*' --acls --numeric-owner -cf - . | tar -C "$WORK/mnt" --xattrs --xattrs-include='*' --acls --numeric-owner -xf -
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$UUID" > "$WORK/mnt/etc/fstab"
KERNEL=$(cd "$WORK/mnt/boot" && ls vmlinuz-* | sort -V | tail -1)
INITRD=$(cd "$WORK/mnt/boot" && ls initrd.img-* | sort -V | tail -1)
mkdir -p "$WORK/mnt/boot/extlinux"
cat > "$WORK/mnt/boot/extlinux/extlinux.conf" <<CONF
DEFAULT debian
TIMEOUT 1
LABEL debian
  LINUX /boot/$KERNEL
  INITRD /boot/$INITRD
  APPEND root=UUID=$UUID ro console=ttyS0 net.ifnames=0 biosdevname=0 quiet
CONF
extlinux --install "$WORK/mnt/boot/extlinux" >/dev/null 2>&1
umount "$WORK/mnt"
losetup -d "$LOOP"; LOOP=""
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$RAW" bs=440 count=1 conv=notrunc status=none

say "packing $BOX"
mkdir -p "$WORK/box"
qemu-img convert -O qcow2 "$RAW" "$WORK/box/box.img"
rm -f "$RAW"
VSIZE=$(( (DISK_MB + 1023) / 1024 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$VSIZE" > "$WORK/box/metadata.json"
cat > "$WORK/box/Vagrantfile" <<'VF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "kvm"
  end
end
VF
tar -C "$WORK/box" -cf "$BOX.tmp" metadata.json box.img Vagrantfile
mv "$BOX.tmp" "$BOX"
rm -rf "$WORK"
say "done: $BOX ($(du -h "$BOX" | cut -f1))"
