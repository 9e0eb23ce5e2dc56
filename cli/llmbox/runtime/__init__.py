"""Where the engine runs: a local Python process here, or (with the container issue) a Docker container."""
