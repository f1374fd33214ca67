"""Running under launchd / systemd: install, uninstall, restart, and the log rotation the service uses."""
