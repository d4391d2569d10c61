"""Read-only analyses of a graph: model size report, channel groups, unit sets, the analyze job."""
