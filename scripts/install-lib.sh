# Sourced by the set-up scripts: `install_into VENV PIP-INSTALL-ARGS...` installs into the virtual environment VENV.
#
# With uv (pinned below; put into VENV by its pip the first time), which downloads, unpacks and byte-compiles in
# parallel: a fresh .venv takes about a third of pip's time. uv is given what pip is configured with on this machine
# (`pip config list`: find-links, index URLs, constraints) and weighs every index as pip does, so both pick the
# same files. Where uv cannot be had (no network for its wheel), pip does the install, as before.
# VESL_INSTALLER=pip forces pip.

UV_VERSION=0.13.10

_pip() {
  local venv=$1
  shift
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

# uv's flags for what pip is configured with (global, user, site files and PIP_* variables)
_uv_flags_from_pip_config() {
  local venv=$1 key value item
  while IFS= read -r line; do
    key=${line%%=*}
    key=${key#*.}
    value=${line#*=}
    value=${value#\'}
    value=${value%\'}
    for item in $value; do
      case "$key" in
        find-links) printf '%s\n' --find-links "$item" ;;
        index-url) printf '%s\n' --index-url "$item" ;;
        extra-index-url) printf '%s\n' --extra-index-url "$item" ;;
        constraint) printf '%s\n' --constraint "$item" ;;
      esac
    done
  done < <(_pip "$venv" config list 2>/dev/null | sort -u)
}

_have_uv() {
  local venv=$1
  [ "${VESL_INSTALLER:-uv}" = uv ] || return 1
  if ! "$venv/bin/uv" --version 2>/dev/null | grep -q "^uv $UV_VERSION"; then
    _pip "$venv" install -q "uv==$UV_VERSION" >/dev/null 2>&1 || {
      echo "setup: uv could not be installed; installing with pip (slower)" >&2
      return 1
    }
  fi
}

_INSTALLER_OF=""   # "VENV=uv" or "VENV=pip": decided (and uv installed, pip's config read) once per VENV
_UV_FLAGS=()

install_into() {
  local venv=$1
  shift
  if [ "${_INSTALLER_OF%%=*}" != "$venv" ]; then
    if _have_uv "$venv"; then
      _INSTALLER_OF="$venv=uv"
      mapfile -t _UV_FLAGS < <(_uv_flags_from_pip_config "$venv")
    else
      _INSTALLER_OF="$venv=pip"
    fi
  fi
  if [ "${_INSTALLER_OF#*=}" = uv ]; then
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --compile-bytecode \
      --index-strategy unsafe-best-match "${_UV_FLAGS[@]}" "$@"
  else
    _pip "$venv" install -q "$@"
  fi
}
