"""The GPU node (seed 003): NVML probe, health worker service, Ollama catalogue, orchestrator
registration, dead-man switch and probabilistic-ticket maths. Imports no agent, fleet, api or web.
"""
