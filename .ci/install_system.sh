#!/usr/bin/env bash
# System packages for the headless napari plugin tests (napari_plugin/tests), Debian 12 / Ubuntu.
# Idempotent: does nothing (no apt-get update) when every package is already installed.
#
#   xvfb                      X virtual framebuffer (pytest-xvfb starts it; also gives xvfb-run)
#   xauth                     needed by xvfb-run only (pytest-xvfb does not need it)
#   libgl1 libegl1 libopengl0 GL/EGL (glvnd) for Qt and vispy; libgl1 pulls libglx-mesa0 and
#                             libgl1-mesa-dri (software rasteriser used under Xvfb)
#   libglib2.0-0 libdbus-1-3 libfontconfig1            linked by the PyQt6 (Qt 6) wheel
#   libx11-xcb1 libxkbcommon-x11-0 libxcb-*            Qt's xcb platform plugin (QT_QPA_PLATFORM=xcb)
set -euo pipefail

PACKAGES=(
  xvfb
  xauth
  libgl1
  libegl1
  libopengl0
  libglib2.0-0
  libdbus-1-3
  libfontconfig1
  libx11-xcb1
  libxkbcommon-x11-0
  libxcb-cursor0
  libxcb-icccm4
  libxcb-image0
  libxcb-keysyms1
  libxcb-randr0
  libxcb-render-util0
  libxcb-shape0
  libxcb-xfixes0
  libxcb-xkb1
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_system: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system: apt-get not found; install these packages by hand: ${missing[*]}" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
    echo "install_system: not root and no sudo; cannot install: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "install_system: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
