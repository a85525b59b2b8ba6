#!/usr/bin/env bash
# Install dfs on a node from a directory of wheels, without network access, and deploy it:
# a virtualenv in PREFIX, the mount helper where mount(8) looks for it, the systemd unit,
# the cluster configuration and secret in /etc/dfs, and an fstab line for the node's mount.
#
#   deploy/install-node.sh --wheels DIR [--config FILE --node NAME] [--mount DIR]
#                          [--prefix DIR] [--root DIR] [--no-start]
#
#   --wheels DIR   wheels of dfs and its dependencies (deploy/build-wheels.sh)
#   --config FILE  the cluster configuration written by `dfs init`; copied with its secret
#                  (the file its cluster.secret_file names) to /etc/dfs/
#   --node NAME    this machine's node: enables dfs-mountd@NAME.service and adds the fstab line
#                  NAME MOUNT fuse.dfs _netdev,x-systemd.requires=dfs-mountd@NAME.service 0 0
#   --mount DIR    the node's mount point (default /mnt/dfs)
#   --prefix DIR   where the virtualenv goes (default /opt/dfs)
#   --root DIR     install into a file system tree at DIR instead of / (an image, a test);
#                  the unit is enabled with `systemctl --root` and nothing is started
#   --no-start     install and enable, but do not start the node now
#
# A node needs the Debian packages fuse3 and python3-venv (python3 >= 3.11); the wheels must
# have been built for the node's Python version and architecture. Run as root. Re-running it
# upgrades dfs and rewrites the files it owns.
set -euo pipefail
WHEELS="" CONFIG="" NODE="" MOUNT=/mnt/dfs PREFIX=/opt/dfs ROOT="" START=1
HERE=$(cd "$(dirname "$0")" && pwd)
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --node) NODE=$2; shift 2 ;;
    --mount) MOUNT=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --root) ROOT=$(realpath -m "$2"); shift 2 ;;
    --no-start) START=0; shift ;;
    -h|--help) usage ;;
    *) echo "install-node: unknown argument $1" >&2; usage ;;
  esac
done
say() { printf '==> install-node: %s\n' "$*" >&2; }
die() { echo "install-node: $*" >&2; exit 1; }
[ -n "$WHEELS" ] || die "--wheels DIR is required"
[ -d "$WHEELS" ] || die "$WHEELS: no such directory"
[ -z "$NODE" ] || [ -n "$CONFIG" ] || die "--node needs --config FILE"
case "$MOUNT" in /*) ;; *) die "--mount must be an absolute path" ;; esac
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
[ "$(id -u)" = 0 ] || [ -n "$ROOT" ] || die "run it as root"
if [ -z "$ROOT" ]; then
  for p in fuse3 python3-venv; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || die "the Debian package $p is missing: apt-get install fuse3 python3-venv"
  done
fi

say "installing dfs into $ROOT$PREFIX from $WHEELS (offline)"
[ -x "$ROOT$PREFIX/bin/python" ] || python3 -m venv "$ROOT$PREFIX"
"$ROOT$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
  --find-links "$WHEELS" --upgrade dfs
# mount(8) looks for /sbin/mount.TYPE; the admin commands go on PATH.
mkdir -p "$ROOT/usr/sbin" "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/bin/mount.fuse.dfs" "$ROOT/usr/sbin/mount.fuse.dfs"
ln -sfn "$PREFIX/bin/dfs" "$ROOT/usr/local/bin/dfs"
ln -sfn "$PREFIX/bin/dfs-mountd" "$ROOT/usr/local/bin/dfs-mountd"

say "installing the unit dfs-mountd@.service"
mkdir -p "$ROOT/etc/systemd/system"
sed "s|/opt/dfs/bin/|$PREFIX/bin/|" "$HERE/dfs-mountd@.service" > "$ROOT/etc/systemd/system/dfs-mountd@.service"
chmod 644 "$ROOT/etc/systemd/system/dfs-mountd@.service"

if [ -n "$CONFIG" ]; then
  [ -f "$CONFIG" ] || die "$CONFIG: no such file"
  SECRET=$("$ROOT$PREFIX/bin/python" -c '
import sys, tomllib
from pathlib import Path
p = Path(sys.argv[1]); s = Path(tomllib.loads(p.read_text())["cluster"]["secret_file"])
print(s if s.is_absolute() else p.parent / s)' "$CONFIG")
  [ -f "$SECRET" ] || die "$SECRET (the secret $CONFIG names): no such file"
  say "installing $CONFIG and its secret into /etc/dfs"
  install -d -m 755 "$ROOT/etc/dfs"
  install -m 644 "$CONFIG" "$ROOT/etc/dfs/cluster.toml"
  install -m 600 "$SECRET" "$ROOT/etc/dfs/$(basename "$SECRET")"
  if ! grep -q "^secret_file *= *\"$(basename "$SECRET")\"" "$ROOT/etc/dfs/cluster.toml"; then
    sed -i "s|^secret_file *=.*|secret_file = \"$(basename "$SECRET")\"|" "$ROOT/etc/dfs/cluster.toml"
  fi
fi

if [ -n "$NODE" ]; then
  UNIT="dfs-mountd@$NODE.service"
  say "node $NODE: $UNIT, mount at $MOUNT, fstab line"
  mkdir -p "$ROOT$MOUNT" "$ROOT/etc/default"
  if [ "$MOUNT" != /mnt/dfs ]; then
    printf 'DFS_MOUNTPOINT=%s\n' "$MOUNT" > "$ROOT/etc/default/dfs-mountd"
  fi
  touch "$ROOT/etc/fstab"
  # One line per mount point: a re-run replaces the line for MOUNT.
  awk -v m="$MOUNT" '!($2 == m && $3 == "fuse.dfs") && $0 != "# dfs node (deploy/install-node.sh)"' \
    "$ROOT/etc/fstab" > "$ROOT/etc/fstab.dfs-new"
  printf '# dfs node (deploy/install-node.sh)\n%s %s fuse.dfs _netdev,x-systemd.requires=%s 0 0\n' \
    "$NODE" "$MOUNT" "$UNIT" >> "$ROOT/etc/fstab.dfs-new"
  mv "$ROOT/etc/fstab.dfs-new" "$ROOT/etc/fstab"
  if [ -n "$ROOT" ]; then
    systemctl --root="$ROOT" enable "$UNIT" >/dev/null 2>&1
  else
    systemctl daemon-reload
    systemctl enable "$UNIT" >/dev/null 2>&1
    if [ "$START" = 1 ]; then
      MOUNT_UNIT=$(systemd-escape --path --suffix=mount "$MOUNT")
      say "starting $UNIT and $MOUNT_UNIT"
      systemctl start "$MOUNT_UNIT"
    fi
  fi
elif [ -z "$ROOT" ]; then
  systemctl daemon-reload 2>/dev/null || true
fi
say "done"
