#!/bin/sh
# Entrypoint of the cnnd image: `cnnd serve "$@"`, after two things a container needs.
# It ends in `exec`, so the server replaces this shell as PID 1 and receives SIGTERM itself
# (it then drains: running jobs checkpoint, and it exits 0).
set -eu

# SECURITY.md: the data dir holds weights and datasets; keep what the server writes private.
umask 077

# The image ships the kernels compiled at build time in $BAKED (the default NUMBA_CACHE_DIR).
# Numba only uses a cache directory it can create files in (it probes with a temporary file),
# so on a read-only root filesystem (Kubernetes readOnlyRootFilesystem, `docker run
# --read-only`), or under a user other than the image's, it would ignore them: compile them
# all again (about a minute) if some other cache directory is writable, or stop at import
# ("cannot cache function ...: no locator available") if none is. Seed a writable directory
# with a copy instead (4 MB, well under a second):
#   * NUMBA_CACHE_DIR set to a writable, empty directory (an emptyDir, a volume): seed it;
#   * NUMBA_CACHE_DIR not writable: use /tmp/cnnd-numba, seeded the same way.
BAKED=/var/cache/cnnd/numba
wanted=${NUMBA_CACHE_DIR:-$BAKED}
cache=$wanted
if ! mkdir -p "$cache" 2>/dev/null || ! [ -w "$cache" ]; then
    cache=/tmp/cnnd-numba
    if ! mkdir -p "$cache" 2>/dev/null || ! [ -w "$cache" ]; then
        echo "cnnd-entrypoint: neither $wanted nor $cache is writable;" \
            "mount a writable volume (tmpfs, emptyDir) at /tmp" >&2
        exit 2
    fi
fi
if [ "$cache" != "$BAKED" ] && [ -d "$BAKED" ] && [ -z "$(ls -A "$cache")" ]; then
    cp -R "$BAKED/." "$cache/"
fi
export NUMBA_CACHE_DIR="$cache"

exec cnnd serve "$@"
