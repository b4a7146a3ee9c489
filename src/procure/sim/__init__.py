"""The market simulator and the planner benchmark: a discrete-event GPU market with hidden failure
hazards, driven by the agent's real planners and guard, compared with a hindsight oracle.
"""
