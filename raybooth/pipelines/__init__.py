"""Ray Data and Ray Train jobs that distribute the Ray-free cores in `raybooth.models`."""
