#!/usr/bin/env bash
# Builds the `outpost` release binary for ARM boards.
#
#   cross/build.sh                       # every ARM target this machine can build (see below)
#   cross/build.sh aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#
# Targets: aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf (gnu: statically linked by
# default), aarch64-unknown-linux-musl, armv7-unknown-linux-musleabihf (musl: always static).
# With no arguments the script builds every one of them it has a Rust std and a C cross compiler
# for and skips the others (saying why); a target named on the command line that cannot be built
# is an error.
#
# Which Rust toolchain builds a target:
#   1. rustup, when the target is installed for the pinned toolchain (`rustup target add ...`, see
#      cross/README.md);
#   2. otherwise Debian's toolchain (rustc-web/cargo-web with libstd-rust-web-dev:<arch>, see
#      scripts/arm-smoke.sh), called explicitly as RUSTC=/usr/bin/rustc /usr/bin/cargo because
#      rustup's proxies come first in PATH.
# The C compiler (for the bundled SQLite) and the linker are the target's cross gcc:
#   aarch64-linux-gnu-gcc, arm-linux-gnueabihf-gcc (apt: gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf),
#   aarch64-linux-musl-gcc, arm-linux-musleabihf-gcc (musl.cc toolchains; none in Debian).
# Set CC_<target> / CARGO_TARGET_<TARGET>_LINKER yourself to use others.
#
# Environment:
#   PROFILE=release          cargo profile (release: the size-tuned one of the root Cargo.toml)
#   OUTPOST_STATIC=1         link gnu targets statically (-C target-feature=+crt-static); 0 = dynamic
#   CARGO_TARGET_DIR=...     default <repo>/target/cross (kept apart from the host builds)
#   OUTPOST_DIST=...         where the finished binaries are copied, default $CARGO_TARGET_DIR/dist
#   OUTPOST_TOOLCHAIN=auto   auto | rustup | debian: force one toolchain
#
# Output: $OUTPOST_DIST/outpost-<target>, and one line per target with its size.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PROFILE="${PROFILE:-release}"
OUTPOST_STATIC="${OUTPOST_STATIC:-1}"
OUTPOST_TOOLCHAIN="${OUTPOST_TOOLCHAIN:-auto}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cross}"
OUTPOST_DIST="${OUTPOST_DIST:-$CARGO_TARGET_DIR/dist}"

ALL_TARGETS=(
  aarch64-unknown-linux-gnu
  armv7-unknown-linux-gnueabihf
  aarch64-unknown-linux-musl
  armv7-unknown-linux-musleabihf
)

log() { printf 'cross/build.sh: %s\n' "$*" >&2; }

# The C cross compiler (also used as the linker) of a target.
cross_cc() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo aarch64-linux-gnu-gcc ;;
    armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf-gcc ;;
    aarch64-unknown-linux-musl) echo aarch64-linux-musl-gcc ;;
    armv7-unknown-linux-musleabihf) echo arm-linux-musleabihf-gcc ;;
    *) return 1 ;;
  esac
}

# Debian's architecture name for a target (for messages: libstd-rust-web-dev:<arch>).
deb_arch() {
  case "$1" in
    aarch64-*) echo arm64 ;;
    armv7-*) echo armhf ;;
  esac
}

rustup_has_target() {
  command -v rustup >/dev/null 2>&1 || return 1
  # Run inside the repository so rust-toolchain.toml's pinned toolchain is the one asked.
  rustup target list --installed 2>/dev/null | grep -qx "$1"
}

debian_has_target() {
  [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || return 1
  local sysroot
  sysroot="$(/usr/bin/rustc --print sysroot 2>/dev/null)" || return 1
  [ -d "$sysroot/lib/rustlib/$1/lib" ]
}

# Prints "rustup" or "debian" for a target, or fails with the reason on stderr.
pick_toolchain() {
  local target="$1"
  if [ "$OUTPOST_TOOLCHAIN" != debian ] && rustup_has_target "$target"; then
    echo rustup
  elif [ "$OUTPOST_TOOLCHAIN" != rustup ] && debian_has_target "$target"; then
    echo debian
  else
    local why="no Rust std for $target: \`rustup target add $target\`"
    case "$target" in
      *-gnu*) why="$why, or Debian's libstd-rust-web-dev:$(deb_arch "$target") (see cross/README.md)" ;;
      *) why="$why (Debian ships no musl std)" ;;
    esac
    log "$why"
    return 1
  fi
}

build_one() {
  local target="$1" toolchain cc ar env_target upper rustflags
  toolchain="$(pick_toolchain "$target")" || return 2
  env_target="${target//-/_}"
  upper="$(echo "$env_target" | tr '[:lower:]' '[:upper:]')"

  cc="$(eval "echo \${CC_${env_target}:-}")"
  if [ -z "$cc" ]; then
    cc="$(cross_cc "$target")"
    if ! command -v "$cc" >/dev/null 2>&1; then
      log "no C cross compiler $cc for $target (needed for the bundled SQLite and as the linker)"
      return 2
    fi
  fi
  ar="$(eval "echo \${AR_${env_target}:-}")"
  if [ -z "$ar" ]; then
    ar="${cc%-gcc}-ar"
    command -v "$ar" >/dev/null 2>&1 || ar="${cc}-ar"
  fi

  rustflags="$(eval "echo \${CARGO_TARGET_${upper}_RUSTFLAGS:-}")"
  case "$target" in
    *-gnu*) [ "$OUTPOST_STATIC" = 1 ] && rustflags="${rustflags:+$rustflags }-C target-feature=+crt-static" ;;
  esac

  local -a cargo
  if [ "$toolchain" = debian ]; then
    cargo=(env RUSTC=/usr/bin/rustc /usr/bin/cargo)
  else
    cargo=(cargo)
  fi
  local linker_var="CARGO_TARGET_${upper}_LINKER"
  local linker="${!linker_var:-$cc}"

  log "building $target ($PROFILE profile, $toolchain toolchain $("${cargo[@]}" --version 2>/dev/null | cut -d' ' -f2), cc $cc${rustflags:+, RUSTFLAGS $rustflags})"
  local start=$SECONDS
  local -a vars=("CC_${env_target}=$cc" "AR_${env_target}=$ar" "CARGO_TARGET_${upper}_LINKER=$linker")
  [ -n "$rustflags" ] && vars+=("CARGO_TARGET_${upper}_RUSTFLAGS=$rustflags")
  env "${vars[@]}" "${cargo[@]}" build --locked -p outpost --profile "$PROFILE" --target "$target" || {
    log "cargo build failed for $target"
    return 1
  }

  local bin="$CARGO_TARGET_DIR/$target/$PROFILE/outpost"
  mkdir -p "$OUTPOST_DIST"
  cp "$bin" "$OUTPOST_DIST/outpost-$target" || return 1
  local size
  size="$(stat -c %s "$bin")"
  printf '%s\t%s bytes (%s MiB)\t%ss\t%s\n' "$target" "$size" \
    "$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')" "$((SECONDS - start))" \
    "$OUTPOST_DIST/outpost-$target"
}

if [ $# -gt 0 ]; then
  targets=("$@")
  strict=1
else
  targets=("${ALL_TARGETS[@]}")
  strict=0
fi

built=0
failed=()
skipped=()
for t in "${targets[@]}"; do
  if ! cross_cc "$t" >/dev/null; then
    log "unknown target $t (one of: ${ALL_TARGETS[*]})"
    exit 2
  fi
  rc=0
  build_one "$t" || rc=$?
  case "$rc" in
    0) built=$((built + 1)) ;;
    2) if [ "$strict" = 1 ]; then failed+=("$t"); else skipped+=("$t"); fi ;;
    *) failed+=("$t") ;;
  esac
done

[ ${#skipped[@]} -gt 0 ] && log "skipped (no toolchain here): ${skipped[*]}"
if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED: ${failed[*]}"
  exit 1
fi
if [ "$built" -eq 0 ]; then
  log "nothing was built"
  exit 1
fi
