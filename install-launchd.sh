#!/usr/bin/env bash
# Install mlx-router as a launchd user agent (macOS): starts at login, restarts if it exits.
# Usage: ./install-launchd.sh [CONFIG]   (default: ./config.json). Run `make install` first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="$(cd "$(dirname "${1:-$here/config.json}")" && pwd)/$(basename "${1:-config.json}")"
label="com.mlx-router.server"
plist="$HOME/Library/LaunchAgents/$label.plist"
python="$here/.venv/bin/python"
logs="$HOME/Library/Logs/mlx-router"
[ "$(uname)" = "Darwin" ] || { echo "launchd exists only on macOS" >&2; exit 1; }
[ -x "$python" ] || { echo "no $python: run 'make install' first" >&2; exit 1; }
[ -f "$config" ] || { echo "no config file $config" >&2; exit 1; }
mkdir -p "$HOME/Library/LaunchAgents" "$logs"
# poppler (pdftoppm) from Homebrew must be on PATH for PDF input.
path="/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
cat > "$plist" <<PLIST
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>$label</string>
  <key>ProgramArguments</key>
  <array><string>$python</string><string>$here/main.py</string><string>--config</string><string>$config</string></array>
  <key>WorkingDirectory</key><string>$here</string>
  <key>EnvironmentVariables</key><dict><key>PATH</key><string>$path</string></dict>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><true/>
  <key>ThrottleInterval</key><integer>10</integer>
  <key>StandardOutPath</key><string>$logs/stdout.log</string>
  <key>StandardErrorPath</key><string>$logs/stderr.log</string>
</dict>
</plist>
PLIST
launchctl bootout "gui/$(id -u)/$label" 2>/dev/null || true
launchctl bootstrap "gui/$(id -u)" "$plist"
echo "installed $plist; logs in $logs and $here/logs"
