"""Quality checks of a served deployment: live parity with the FP32 reference, reliability
under faults, failover through the balancer, and the GPU checks and acceptance run."""
