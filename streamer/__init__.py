"""Streamer: request tasks, the scheduler and the step loop of a continuous-batching server."""
