"""edge-af3 benchmarks: each runs the peers in the same process on the same inputs."""
