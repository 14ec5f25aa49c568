"""Prefect flows: the pipeline flow, its deployments and the data stages' shard runners."""
