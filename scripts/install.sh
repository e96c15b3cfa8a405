#!/usr/bin/env bash
# Install or upgrade the appliance as a systemd service. Safe to re-run: an upgrade is the same command.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo scripts/install.sh [options]

Installs the appliance from this checkout: the app in /opt/appliance (with its virtual environment),
data in /var/lib/appliance, settings in /etc/appliance/appliance.env, the systemd unit
appliance.service; then starts it and waits for http://127.0.0.1:8000/health.
Re-run it to upgrade; your appliance.env, nginx site and data are kept.

Options:
  --gpu cuda|cpu     build llama.cpp with CUDA (needs the CUDA toolkit; also installs the GPU drop-in
                     /etc/systemd/system/appliance.service.d/gpu.conf), or back to CPU only.
                     Remembered for later runs (/etc/appliance/install.conf). Default: cpu.
  --nginx            also install the nginx site (/etc/nginx/sites-available/appliance.conf), a
                     self-signed certificate in /etc/appliance/tls if none is there, and reload nginx
  --no-sync          do not create/update the virtual environment (uv sync) or run `appliance doctor`
  --no-start         install everything but do not enable/start the service
  --timeout SECONDS  how long to wait for /health after the start (default 300)
  --root DIR         stage the files under DIR instead of / (also: DESTDIR=DIR); touches no users,
                     systemd or nginx of this host, and implies --no-sync
  -h, --help         this text
EOF
}

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${DESTDIR:-}
GPU=""
NGINX=0
SYNC=1
START=1
TIMEOUT=300
# The uv that builds the environment, installed into its own virtual environment in /opt/appliance/.uv
# (never into the system Python). Raise it together with the uv that wrote uv.lock.
UV_VERSION=0.13.9

die() { echo "install.sh: error: $*" >&2; exit 1; }
warn() { echo "install.sh: warning: $*" >&2; }
say() { echo "==> $*"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --gpu) [[ $# -ge 2 ]] || die "--gpu needs cuda or cpu"; GPU=$2; shift ;;
        --gpu=*) GPU=${1#*=} ;;
        --nginx) NGINX=1 ;;
        --no-sync) SYNC=0 ;;
        --no-start) START=0 ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs seconds"; TIMEOUT=$2; shift ;;
        --root) [[ $# -ge 2 ]] || die "--root needs a directory"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
[[ -z $GPU || $GPU == cuda || $GPU == cpu ]] || die "--gpu: expected cuda or cpu, got '$GPU'"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout: expected seconds, got '$TIMEOUT'"

STAGED=0
if [[ -n $ROOT ]]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [[ $ROOT != / ]] || die "--root /: leave --root out to install on this host"
    STAGED=1
    SYNC=0
    START=0
fi

APP=$ROOT/opt/appliance
DATA=$ROOT/var/lib/appliance
ETC=$ROOT/etc/appliance
UNIT_DIR=$ROOT/etc/systemd/system
SITES=$ROOT/etc/nginx

# --- checks -------------------------------------------------------------------------------------

[[ $(uname -s) == Linux ]] || die "Linux only (this is $(uname -s))"
ARCH=$(uname -m)
case $ARCH in
    x86_64 | aarch64) ;;
    *) die "unsupported CPU architecture $ARCH (x86_64 or aarch64)" ;;
esac
CPU_FLAGS=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has_flag() { [[ $CPU_FLAGS == *" $1 "* ]]; }
if [[ $ARCH == x86_64 ]] && ! has_flag avx2; then
    warn "this CPU has no AVX2: llama.cpp will be slow; it is built without AVX2/AVX-512 here"
fi
if [[ $STAGED == 0 && $EUID -ne 0 ]]; then
    die "run as root (sudo), or stage the files with --root DIR"
fi
[[ -f $SRC/pyproject.toml && -d $SRC/appliance ]] || die "$SRC does not look like the appliance checkout"
[[ $SRC != "$APP" ]] || die "run install.sh from a checkout, not from the installed copy in $APP"

SYSTEMD=0
if [[ $STAGED == 0 && -d /run/systemd/system ]]; then
    SYSTEMD=1
elif [[ $STAGED == 0 ]]; then
    warn "systemd is not running here: the unit is installed but not enabled or started"
    START=0
fi

# The GPU choice is remembered so that a plain re-run (an upgrade) keeps a CUDA build.
if [[ -z $GPU && -f $ETC/install.conf ]]; then
    GPU=$(sed -n 's/^GPU=//p' "$ETC/install.conf" | tail -n1)
fi
GPU=${GPU:-cpu}

# --- user and directories -------------------------------------------------------------------------

if [[ $STAGED == 0 ]] && ! id -u appliance >/dev/null 2>&1; then
    say "creating the system user 'appliance'"
    useradd --system --user-group --home-dir /var/lib/appliance --no-create-home \
        --shell /usr/sbin/nologin --comment "appliance LLM server" appliance
fi
# Owner changes only on the real host: a staged tree stays owned by whoever ran the script.
own() { if [[ $STAGED == 0 ]]; then chown "$@"; fi; }

install -d -m 0755 "$APP" "$UNIT_DIR"
install -d -m 0750 "$DATA" "$ETC"
own appliance:appliance "$DATA"
own root:appliance "$ETC"

if [[ $SYSTEMD == 1 ]] && systemctl is-active --quiet appliance; then
    say "stopping appliance.service for the upgrade"
    systemctl stop appliance
fi

# --- the app --------------------------------------------------------------------------------------

say "copying the app to $APP"
# Replace the previous version's files but keep its virtual environment (and a uv-managed Python).
find "$APP" -mindepth 1 -maxdepth 1 ! -name .venv ! -name .python ! -name .uv -exec rm -rf {} +
tar -C "$SRC" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./data --exclude=./.env --exclude=./.python --exclude=./.uv \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.pyc' . |
    tar -C "$APP" --no-same-owner -xf -
chmod -R u+rwX,go+rX,go-w "$APP"

# llama.cpp's build flags live in pyproject.toml ([tool.uv.extra-build-variables] CMAKE_ARGS; uv gives
# them precedence over a CMAKE_ARGS in the environment). Adjust the installed copy for this CPU and GPU.
PYPROJECT=$APP/pyproject.toml
CMAKE_LINE='^llama-cpp-python = { *CMAKE_ARGS = "'
CMAKE_ARGS_NOW=$(sed -n "s/${CMAKE_LINE}\\([^\"]*\\)\".*/\\1/p" "$PYPROJECT")
CMAKE_ARGS_NEW=$CMAKE_ARGS_NOW
if [[ $ARCH == x86_64 ]]; then
    for pair in AVX:avx AVX2:avx2 FMA:fma F16C:f16c AVX512:avx512f; do
        has_flag "${pair#*:}" || CMAKE_ARGS_NEW=${CMAKE_ARGS_NEW//-DGGML_${pair%%:*}=ON/-DGGML_${pair%%:*}=OFF}
    done
fi
[[ $GPU == cuda ]] && CMAKE_ARGS_NEW="$CMAKE_ARGS_NEW -DGGML_CUDA=on"
if [[ $CMAKE_ARGS_NEW != "$CMAKE_ARGS_NOW" ]]; then
    [[ -n $CMAKE_ARGS_NOW ]] || die "no llama-cpp-python CMAKE_ARGS in $PYPROJECT to adjust"
    sed -i "s|${CMAKE_LINE}[^\"]*\"|llama-cpp-python = { CMAKE_ARGS = \"${CMAKE_ARGS_NEW# }\"|" "$PYPROJECT"
    say "llama.cpp build flags for this host: ${CMAKE_ARGS_NEW# }"
fi

if [[ $SYNC == 1 ]]; then
    # A pinned uv in a virtual environment of its own: the system Python's packages stay untouched (no
    # pip into /usr, no --break-system-packages), and every install builds with the same uv.
    UV=$APP/.uv/bin/uv
    if [[ ! -x $UV || $("$UV" --version 2>/dev/null) != "uv $UV_VERSION"* ]]; then
        say "installing uv $UV_VERSION into $APP/.uv"
        command -v python3 >/dev/null || die "python3 is missing: apt-get install python3 python3-venv"
        rm -rf "$APP/.uv"
        python3 -m venv "$APP/.uv" ||
            die "could not create a virtual environment for uv: apt-get install python3-venv"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$APP/.uv/bin/python" -m pip install --quiet "uv==$UV_VERSION" ||
            die "could not install uv $UV_VERSION from PyPI into $APP/.uv"
    fi
    if [[ $GPU == cuda ]]; then
        [[ -d /usr/local/cuda/bin ]] && export PATH=$PATH:/usr/local/cuda/bin
        command -v nvcc >/dev/null || die "--gpu cuda: nvcc not found; install the CUDA toolkit first"
    fi
    sync_args=(sync --frozen --no-dev --compile-bytecode)
    # Rebuild llama-cpp-python when the installed build used other flags (uv records them).
    build_info=$(cat "$APP"/.venv/lib/python3*/site-packages/llama_cpp_python-*.dist-info/uv_build.json \
        2>/dev/null || true)
    if [[ -n $build_info && $build_info != *"\"${CMAKE_ARGS_NEW# }\""* ]]; then
        sync_args+=(--reinstall-package llama-cpp-python)
    elif [[ -z $build_info && -d $APP/.venv && $GPU == cuda ]]; then
        sync_args+=(--reinstall-package llama-cpp-python)
    fi
    # Everything the service runs must live outside /root and /home (the unit has ProtectHome=yes):
    # the distribution's python3 when it is new enough, else a uv-managed one in /opt/appliance/.python;
    # package files copied out of uv's cache rather than hardlinked.
    export UV_LINK_MODE=copy UV_PYTHON_INSTALL_DIR=$APP/.python
    if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        export UV_PYTHON=/usr/bin/python3
    else
        export UV_PYTHON_PREFERENCE=only-managed
    fi
    say "uv ${sync_args[*]} (building llama.cpp can take 10+ minutes)"
    (cd "$APP" && "$UV" "${sync_args[@]}")
    python=$(readlink -f "$APP/.venv/bin/python")
    case $python in
        /root/* | /home/*) die "the venv's Python is $python, hidden from the service (ProtectHome=yes)" ;;
    esac
    "$APP/.venv/bin/python" -m compileall -q "$APP/appliance" >/dev/null || true
fi

# --- configuration --------------------------------------------------------------------------------

if [[ ! -e $ETC/appliance.env ]]; then
    say "writing $ETC/appliance.env"
    install -m 0640 "$SRC/systemd/appliance.env" "$ETC/appliance.env"
    own root:appliance "$ETC/appliance.env"
else
    say "keeping $ETC/appliance.env"
fi

# The keys file and the models file are read-only to the service (root:appliance 0640 in a root-owned
# directory; the unit also has ReadOnlyPaths=/etc/appliance): a compromised service can neither add a
# key nor repoint a model. Admins manage them as root: `sudo appliance keys add NAME` (with
# APPLIANCE_KEYS_FILE=/etc/appliance/keys.toml), which keeps the file's owner and mode.
# Older installs kept them in the data directory, writable by the service: move them here once.
setting_in_env() { grep -q "^APPLIANCE_$1=" "$ETC/appliance.env"; }
for pair in KEYS_FILE:keys.toml MODELS_FILE:models.toml; do
    var=${pair%%:*} file=${pair#*:}
    setting_in_env "$var" && continue
    if [[ -f $DATA/$file && ! -e $ETC/$file ]]; then
        say "moving $DATA/$file to $ETC/$file (read-only to the service)"
        mv "$DATA/$file" "$ETC/$file"
    fi
    if [[ $var == KEYS_FILE || -e $ETC/$file ]]; then
        say "setting APPLIANCE_$var=/etc/appliance/$file in $ETC/appliance.env"
        printf '\n# Added by scripts/install.sh: read-only to the service; manage it as root (sudo).\nAPPLIANCE_%s=/etc/appliance/%s\n' \
            "$var" "$file" >>"$ETC/appliance.env"
    fi
done
if [[ ! -e $ETC/keys.toml ]]; then
    say "creating an empty keys file $ETC/keys.toml"
    say "  add keys with: sudo /opt/appliance/.venv/bin/appliance keys add NAME --keys-file /etc/appliance/keys.toml"
    printf '%s\n' "# API keys of the appliance: sudo /opt/appliance/.venv/bin/appliance keys add|list|revoke ..." \
        "# --keys-file /etc/appliance/keys.toml (keeps this file's owner root:appliance and mode 0640)." >"$ETC/keys.toml"
fi
for file in keys.toml models.toml; do
    if [[ -f $ETC/$file && ! -L $ETC/$file ]]; then
        chmod 0640 "$ETC/$file"
        own root:appliance "$ETC/$file"
    fi
done

printf '# written by scripts/install.sh\nGPU=%s\n' "$GPU" >"$ETC/install.conf"
chmod 0644 "$ETC/install.conf"

say "installing $UNIT_DIR/appliance.service"
install -m 0644 "$SRC/systemd/appliance.service" "$UNIT_DIR/appliance.service"
if [[ $GPU == cuda ]]; then
    install -d -m 0755 "$UNIT_DIR/appliance.service.d"
    install -m 0644 "$SRC/systemd/gpu.conf" "$UNIT_DIR/appliance.service.d/gpu.conf"
elif [[ -e $UNIT_DIR/appliance.service.d/gpu.conf ]]; then
    rm -f "$UNIT_DIR/appliance.service.d/gpu.conf"
    rmdir "$UNIT_DIR/appliance.service.d" 2>/dev/null || true
fi

# Check the host and the models with the service's user and environment (the port must be free: the
# service is stopped). Also assembles a chunked embedded model into the data directory once.
run_doctor() {
    (cd /var/lib/appliance && runuser -u appliance -- env -i PATH=/usr/bin:/bin HOME=/var/lib/appliance \
        APPLIANCE_DATA_DIR=/var/lib/appliance HF_HUB_OFFLINE=1 \
        sh -c 'set -a; . /etc/appliance/appliance.env; exec /opt/appliance/.venv/bin/appliance doctor')
}
if [[ $STAGED == 0 && -x $APP/.venv/bin/appliance ]]; then
    say "appliance doctor"
    run_doctor || die "appliance doctor reported FAIL above; fix it and re-run install.sh"
fi

# --- nginx ----------------------------------------------------------------------------------------

if [[ $NGINX == 1 ]]; then
    [[ $STAGED == 1 ]] || command -v nginx >/dev/null || die "--nginx: nginx is not installed (apt-get install nginx)"
    install -d -m 0755 "$SITES/sites-available" "$SITES/sites-enabled"
    if cmp -s "$SRC/nginx/appliance.conf" "$SITES/sites-available/appliance.conf"; then
        : # unchanged
    elif [[ -e $SITES/sites-available/appliance.conf ]]; then
        say "keeping your $SITES/sites-available/appliance.conf (this version's is appliance.conf.dist)"
        install -m 0644 "$SRC/nginx/appliance.conf" "$SITES/sites-available/appliance.conf.dist"
    else
        install -m 0644 "$SRC/nginx/appliance.conf" "$SITES/sites-available/appliance.conf"
    fi
    ln -sfn ../sites-available/appliance.conf "$SITES/sites-enabled/appliance.conf"
    if [[ ! -e $ETC/tls/fullchain.pem ]] && command -v openssl >/dev/null; then
        say "creating a self-signed certificate in $ETC/tls (replace it: see README, TLS)"
        install -d -m 0700 "$ETC/tls"
        (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=$(hostname -f 2>/dev/null || hostname)" \
            -keyout "$ETC/tls/privkey.pem" -out "$ETC/tls/fullchain.pem" 2>/dev/null)
    fi
    if [[ $STAGED == 0 ]]; then
        if ! nginx -t; then
            rm -f "$SITES/sites-enabled/appliance.conf"
            die "nginx -t failed with the appliance site; it is disabled again (fix it, re-run with --nginx)"
        fi
        if [[ $SYSTEMD == 1 ]] && systemctl is-active --quiet nginx; then systemctl reload nginx; fi
    fi
fi

# --- the service ----------------------------------------------------------------------------------

if [[ $SYSTEMD == 1 ]]; then
    systemctl daemon-reload
    systemctl enable --quiet appliance
fi
if [[ $START == 1 ]]; then
    say "starting appliance.service"
    systemctl start appliance || true
    port=$(sed -n 's/^APPLIANCE_PORT=//p' "$ETC/appliance.env" | tail -n1)
    url="http://127.0.0.1:${port:-8000}/health"
    say "waiting up to ${TIMEOUT}s for $url"
    deadline=$((SECONDS + TIMEOUT))
    until "$APP/.venv/bin/python" -c "import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)" "$url" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            systemctl --no-pager status appliance || true
            journalctl -u appliance -n 40 --no-pager || true
            die "$url did not answer 200 within ${TIMEOUT}s (see the log above: journalctl -u appliance)"
        fi
        sleep 2
    done
    say "the appliance is up: $url"
fi

if [[ $STAGED == 1 ]]; then
    say "staged under $ROOT"
elif [[ $START == 0 ]]; then
    say "installed; start it with: systemctl enable --now appliance"
fi
