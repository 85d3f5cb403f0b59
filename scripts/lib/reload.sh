# Sourced by scripts/install and scripts/uninstall.
#
#   reload_managers     tells a running udevd and a running systemd to read their
#                       rules and units again (nothing when they do not run)
reload_managers() {
    if command -v udevadm >/dev/null && udevadm control --ping >/dev/null 2>&1; then
        udevadm control --reload || true
    fi
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        systemctl daemon-reload || true
    fi
}
