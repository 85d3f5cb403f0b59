# Sourced by every script that builds the crate (scripts/demo, scripts/test,
# scripts/setup-guest): makes sure of what the build needs beyond cargo.
#
# libublk-rs-sys runs bindgen, which loads libclang.so itself (the unversioned
# name, shipped by Debian's libclang-dev). A machine may carry other libclang
# libraries (libclang-cpp.so.14 from libclang-cpp14, libclang.so.1 from
# libclang1-14) that bindgen cannot use, so the check looks for libclang.so
# itself or for the package, never for a name that merely starts with libclang.
#
#   ensure_build_deps     installs libclang-dev when missing (root), else fails
#                         with a line that says what to install

# True when bindgen will find a libclang it can load.
have_bindgen_libclang() {
    if [[ -n ${LIBCLANG_PATH:-} ]] && compgen -G "$LIBCLANG_PATH/libclang.so*" >/dev/null; then
        return 0
    fi
    dpkg-query -W -f='${Status}\n' libclang-dev 2>/dev/null | grep -qx 'install ok installed' && return 0
    compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null && return 0
    compgen -G '/usr/lib/x86_64-linux-gnu/libclang.so' >/dev/null && return 0
    return 1
}

ensure_build_deps() {
    if have_bindgen_libclang; then
        return 0
    fi
    if [[ $EUID -ne 0 ]]; then
        printf 'build-deps: libclang.so not found (bindgen needs it to build libublk): install libclang-dev as root\n' >&2
        return 1
    fi
    printf 'build-deps: installing libclang-dev (bindgen needs libclang.so to build libublk)\n'
    local log rc=0
    log=$(mktemp)
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libclang-dev
    } >"$log" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        sed 's/^/    /' "$log" >&2
        rm -f "$log"
        printf 'build-deps: apt-get install libclang-dev failed\n' >&2
        return 1
    fi
    rm -f "$log"
    have_bindgen_libclang || {
        printf 'build-deps: libclang-dev is installed but no libclang.so was found\n' >&2
        return 1
    }
}
