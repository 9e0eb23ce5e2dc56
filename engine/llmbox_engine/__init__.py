"""The llmbox engine: data ingestion, training and serving. Runs in the container or with --runtime local."""
