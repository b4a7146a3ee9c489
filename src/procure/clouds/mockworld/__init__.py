"""What the three mock clouds share: the simulated world (a clock that can run fast, `clock`; a
workload's jobs, `workload`; their placement on the GPUs, `placement`) and the mock's machinery
(serving it and its common admin routes, `server`; injected faults, `faults`; one real GPU node
per live instance, `nodes`)."""
