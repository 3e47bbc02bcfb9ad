#!/usr/bin/env bash
# Offline set-up for the `deno` engine (cargo feature `deno`), then runs a command with it.
#
#   scripts/deno-setup.sh                                  # builds with --features deno
#   scripts/deno-setup.sh cargo test --features deno --lib engine
#
# deno_core's QuickJS backend (the v8x crate) builds WAMR with CMake. That needs CMake 3.24 or
# later, and WAMR's CMake fetches the SIMDe headers from GitHub with FetchContent, which cannot
# work without that network. So both come from PyPI instead: the `cmake` wheel, and the
# `simde-py` source package, whose sdist carries SIMDe 0.8.2's headers (the tag WAMR asks for).
# A CMake toolchain file, named by the CMAKE_TOOLCHAIN_FILE environment variable that CMake
# reads when no -D gives one, points FETCHCONTENT_SOURCE_DIR_SIMDE at them, which makes
# FetchContent use that directory instead of downloading.
#
# Everything lands in .deno-tools/ inside the clone (ignored by git) and is reused when present.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${DENO_TOOLS_DIR:-$root/.deno-tools}"
simde_version=0.8.2
mkdir -p "$tools"

# A venv of our own: the system pip may be externally managed, and the machine's cmake (if any)
# may be older than 3.24.
if [[ ! -x "$tools/venv/bin/cmake" ]]; then
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check 'cmake>=3.24,<5'
fi

simde_dir="$tools/simde-$simde_version"
if [[ ! -f "$simde_dir/simde/simde-common.h" ]]; then
    rm -rf "$tools/simde-dl" "$simde_dir"
    # --no-binary so pip hands over the sdist (the wheel may not carry the headers). pip still
    # reads the sdist's metadata, in an isolated build environment of its own from PyPI.
    "$tools/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --no-binary :all: -d "$tools/simde-dl" "simde-py==$simde_version"
    mkdir -p "$tools/simde-x"
    tar -xzf "$tools/simde-dl/simde_py-$simde_version.tar.gz" -C "$tools/simde-x"
    # The sdist nests the SIMDe tree as simde_py/simde/, whose simde/ holds the headers: the
    # same layout as SIMDe's own repository, which is what FetchContent would have cloned.
    mv "$tools/simde-x/simde_py-$simde_version/simde_py/simde" "$simde_dir"
    rm -rf "$tools/simde-x" "$tools/simde-dl"
fi

cat > "$tools/toolchain.cmake" <<CMAKE
# Written by scripts/deno-setup.sh: SIMDe from the local copy, never from the network.
set(FETCHCONTENT_SOURCE_DIR_SIMDE "$simde_dir" CACHE PATH "" FORCE)
set(FETCHCONTENT_FULLY_DISCONNECTED ON CACHE BOOL "" FORCE)
CMAKE

export PATH="$tools/venv/bin:$PATH"
export CMAKE_TOOLCHAIN_FILE="$tools/toolchain.cmake"

if [[ $# -eq 0 ]]; then
    set -- cargo build --features deno
fi
exec "$@"
