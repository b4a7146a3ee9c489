"""The fleet controller (seed 004): monitor GPU instances, decide, act behind rails, audit."""
