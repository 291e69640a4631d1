#!/usr/bin/env bash
# Test-only: stand-ins for the base images the Dockerfiles name, for an engine that reaches no image
# registry (CI). Each is a Debian bookworm rootfs from debootstrap, given what the official image
# has, `docker import`ed under the official name:
#   python:3.11.14-slim-bookworm  python3.11 with pip and venv: python, python3, pip in /usr/local/bin
#   debian:bookworm-slim          plain Debian with apt (the CPU base of workers/stage1/Dockerfile)
#   redis:7.4.9-alpine            redis-server, redis-cli and sh; user redis (999:1000) owns /data
# each with the machine's CA certificates (and pip told to use them).
# Never used when the real images can be pulled (scripts/compose-smoke.sh decides).
#
#   DOCKER="docker -H unix:///path/docker.sock" scripts/compose/make-base-images.sh [WORKDIR]
# The names can be changed: PYTHON_IMAGE, DEBIAN_IMAGE, REDIS_IMAGE; MAKE lists the ones to make
# (default "python debian redis").
set -euo pipefail
DOCKER=${DOCKER:-docker}
PYTHON_IMAGE=${PYTHON_IMAGE:-python:3.11.14-slim-bookworm}
DEBIAN_IMAGE=${DEBIAN_IMAGE:-debian:bookworm-slim}
REDIS_IMAGE=${REDIS_IMAGE:-redis:7.4.9-alpine}
work=${1:-$(mktemp -d)}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$work"
want() { case " ${MAKE:-python debian redis} " in *" $1 "*) return 0 ;; esac; return 1; }

tar_import() {  # rootfs image [changes...]
    local rootfs=$1 image=$2; shift 2
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | $DOCKER import "$@" - "$image" >/dev/null
    echo "made $image"
}

# One rootfs with apt, then copies for each image (debootstrap runs once).
base="$work/bookworm"
if [ ! -x "$base/usr/bin/apt-get" ]; then
    debootstrap --variant=minbase --include=ca-certificates bookworm "$base" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
fi
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$base/etc/apt/sources.list"
cp /etc/resolv.conf "$base/etc/resolv.conf"
# The machine's CA certificates (its way to the package index may present its own CA), for apt,
# pip (which otherwise trusts only its own bundle) and Python.
cp /etc/ssl/certs/ca-certificates.crt "$base/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$base/usr/local/share/ca-certificates"
cp /etc/ssl/certs/ca-certificates.crt "$base/usr/local/share/ca-certificates/machine-bundle.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$base/etc/pip.conf"

in_root() {  # rootfs command...
    local rootfs=$1; shift
    mount --bind /proc "$rootfs/proc"
    # shellcheck disable=SC2064
    trap "umount '$rootfs/proc' 2>/dev/null || true" RETURN
    chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

# debian:bookworm-slim
if want debian; then tar_import "$base" "$DEBIAN_IMAGE" --change 'CMD ["bash"]'; fi

# python:3.11.14-slim-bookworm: Debian's python3.11 in a venv at /usr/local (so pip installs
# there without PEP 668's refusal, as in the official image).
py="$work/python"
if want python; then
rm -rf "$py" && cp -a "$base" "$py"
in_root "$py" sh -ec '
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv >/dev/null
    python3.11 -m venv /usr/local
    ln -sf python3.11 /usr/local/bin/python
    ln -sf python3.11 /usr/local/bin/python3
    /usr/local/bin/python -c "import ssl, sqlite3, venv; print(\"python\", __import__(\"sys\").version.split()[0])"
    /usr/local/bin/pip --version'
tar_import "$py" "$PYTHON_IMAGE" \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]'
fi

# redis:7.4.9-alpine: the official image's redis user is 999:1000 and owns /data.
rd="$work/redis"
if want redis; then
rm -rf "$rd" && cp -a "$base" "$rd"
in_root "$rd" sh -ec '
    groupadd -r -g 1000 redis && useradd -r -u 999 -g redis -d /data -s /usr/sbin/nologin redis
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
    mkdir -p /data && chown 999:1000 /data
    redis-server --version'
tar_import "$rd" "$REDIS_IMAGE" \
    --change 'WORKDIR /data' --change 'EXPOSE 6379' --change 'CMD ["redis-server"]'
fi
