"""What scripts/release.sh builds (wheels, the container image), installed and run."""
