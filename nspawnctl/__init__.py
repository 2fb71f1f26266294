"""nspawnctl: socket-activated systemd-nspawn containers from one YAML file each."""

__version__ = "0.3.0"
