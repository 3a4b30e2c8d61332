"""What runs after the live image boots: config, the controller transport, the job loop, the jobs."""
