"""The `dfloat` command."""
