"""The simulated world the mock clouds run: a clock that can run fast (`clock`), the jobs of a
workload (`workload`) and their placement on the mock cluster's GPUs (`placement`)."""
