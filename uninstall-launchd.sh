#!/usr/bin/env bash
# Stop and remove the mlx-router launchd user agent. Models, config and logs are left alone.
set -euo pipefail
label="com.mlx-router.server"
plist="$HOME/Library/LaunchAgents/$label.plist"
launchctl bootout "gui/$(id -u)/$label" 2>/dev/null || true
rm -f "$plist"
echo "removed $label"
