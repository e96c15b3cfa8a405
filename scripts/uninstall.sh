#!/usr/bin/env bash
# Remove the appliance service; keeps its data and settings unless --purge.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo scripts/uninstall.sh [--purge] [--root DIR]

Stops and disables appliance.service and removes the unit (and its drop-ins), the nginx site and
/opt/appliance. Keeps /var/lib/appliance (data, models) and /etc/appliance (settings, certificates).

Options:
  --purge      also remove /var/lib/appliance, /etc/appliance and the 'appliance' user
  --root DIR   remove a staged install under DIR (also: DESTDIR=DIR); touches nothing else
  -h, --help   this text
EOF
}

ROOT=${DESTDIR:-}
PURGE=0
die() { echo "uninstall.sh: error: $*" >&2; exit 1; }
say() { echo "==> $*"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --purge) PURGE=1 ;;
        --root) [[ $# -ge 2 ]] || die "--root needs a directory"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

STAGED=0
if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || die "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd)
    [[ $ROOT != / ]] || die "--root /: leave --root out to uninstall from this host"
    STAGED=1
elif [[ $EUID -ne 0 ]]; then
    die "run as root (sudo), or use --root DIR for a staged install"
fi
SYSTEMD=0
[[ $STAGED == 0 && -d /run/systemd/system ]] && SYSTEMD=1

if [[ $SYSTEMD == 1 ]] && systemctl cat appliance.service >/dev/null 2>&1; then
    say "stopping and disabling appliance.service"
    systemctl disable --now appliance || true
fi
say "removing the unit, the nginx site and $ROOT/opt/appliance"
rm -f "$ROOT/etc/systemd/system/appliance.service"
rm -rf "$ROOT/etc/systemd/system/appliance.service.d"
if [[ $SYSTEMD == 1 ]]; then systemctl daemon-reload; fi

site_enabled=$ROOT/etc/nginx/sites-enabled/appliance.conf
had_site=0
[[ -e $site_enabled || -L $site_enabled ]] && had_site=1
rm -f "$site_enabled" "$ROOT"/etc/nginx/sites-available/appliance.conf{,.dist}
if [[ $had_site == 1 && $SYSTEMD == 1 ]] && systemctl is-active --quiet nginx; then
    if nginx -t 2>/dev/null; then systemctl reload nginx; else echo "nginx -t fails: not reloading nginx" >&2; fi
fi

rm -rf "$ROOT/opt/appliance"

if [[ $PURGE == 1 ]]; then
    say "purging $ROOT/var/lib/appliance and $ROOT/etc/appliance"
    rm -rf "$ROOT/var/lib/appliance" "$ROOT/etc/appliance"
    if [[ $STAGED == 0 ]] && id -u appliance >/dev/null 2>&1; then
        say "removing the user 'appliance'"
        userdel appliance || true
    fi
else
    say "kept $ROOT/var/lib/appliance and $ROOT/etc/appliance (remove them with --purge)"
fi
