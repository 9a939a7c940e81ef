"""Remote (Redis) tier tests: real redis-server processes on loopback, started and stopped by fixtures."""
