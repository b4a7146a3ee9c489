"""The agent: the tick, the planners, the guard every action passes, and the worker loop."""
